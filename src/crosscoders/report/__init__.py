"""Static HTML report: run overview, training curves, diffing plots and a feature browser.

``build_report(diff_dir, run_dir)`` reads the analysis and training outputs from disk;
``render_report(ReportData, out)`` is the lower level, for data already in memory.
See ``docs/report.md``.
"""

from crosscoders.report.build import build_report
from crosscoders.report.data import Example, ReportData
from crosscoders.report.load import load_report_data
from crosscoders.report.render import render_report
from crosscoders.report.top_tokens import decoder_top_tokens

__all__ = [
    "Example",
    "ReportData",
    "build_report",
    "decoder_top_tokens",
    "load_report_data",
    "render_report",
]
