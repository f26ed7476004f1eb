"""The whole experiment from one YAML config: organism/harvest -> train -> diff -> report."""

from crosscoders.pipeline.config import PipelineConfig
from crosscoders.pipeline.run import PipelineResult, run_pipeline

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline"]
