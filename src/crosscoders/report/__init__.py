"""Static HTML report: run overview, training curves, diffing plots and a feature browser.

``build_report(diff_dir, run_dir)`` reads the analysis and training outputs from disk;
``render_report(ReportData, out)`` is the lower level, for data already in memory. A layers
directory gets the layers report (``report.layers``: ``build_layers_report``,
``render_layers_report(LayersReportData, out)``). See ``docs/report.md``.
"""

from crosscoders.report.build import build_report
from crosscoders.report.data import Example, ReportData
from crosscoders.report.layers import (
    LayersReportData,
    build_layers_report,
    load_layers_data,
    render_layers_report,
)
from crosscoders.report.load import load_report_data
from crosscoders.report.render import render_report
from crosscoders.report.top_tokens import decoder_top_tokens

__all__ = [
    "Example",
    "LayersReportData",
    "ReportData",
    "build_layers_report",
    "build_report",
    "decoder_top_tokens",
    "load_layers_data",
    "load_report_data",
    "render_layers_report",
    "render_report",
]
