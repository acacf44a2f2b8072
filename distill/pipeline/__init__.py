"""``darht pipeline``: pool -> matrix -> recommendation -> students -> evaluation -> report."""

from distill.pipeline.config import describe_plan, load_study_config, validate_study_config
from distill.pipeline.runner import PipelineResult, run_pipeline

__all__ = ["run_pipeline", "PipelineResult", "load_study_config", "validate_study_config", "describe_plan"]
