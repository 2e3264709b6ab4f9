"""The end-to-end specialisation job (``jobs/specialize.py``, ``nexus specialize``)."""

from nexus.job.config import JobConfig, load_config
from nexus.job.run import STAGES, run_job

__all__ = ["STAGES", "JobConfig", "load_config", "run_job"]
