"""The end-to-end specialisation job (``jobs/specialize.py``, ``nexus specialize``)."""

from nexus.pipeline.config import JobConfig, load_config
from nexus.pipeline.stages import STAGES, run_job

__all__ = ["STAGES", "JobConfig", "load_config", "run_job"]
