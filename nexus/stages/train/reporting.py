"""Experiment trackers for training: TensorBoard, MLflow and Weights & Biases.

``train.report_to`` (``--report-to``) names the trackers; rank 0 sends each row it appends
to ``metrics.jsonl`` (one point per optimizer step, the held-out metrics on the steps that
evaluate, the step-0 evaluation) to every one of them, every numeric field under its own name
(``loss``, ``ce``, ``kd``, ``lr``, ``eval_ppl``...), so the curves a tracker draws are the
file's. The libraries are optional extras, imported only when asked for; :func:`check_trackers`
runs on the driver before training starts and names the missing extra in one line.

Where the points go:

- ``tensorboard``: event files in ``<storage_path>/<run name>/tensorboard`` while training
  (point ``tensorboard --logdir`` there to watch), copied into ``<output>/tensorboard`` when
  the run finishes. A resumed run restarts its writer with ``purge_step`` just after the
  checkpoint's step, so TensorBoard hides the points logged after that checkpoint by the
  failed attempt, and the curve is the one of ``metrics.jsonl``.
- ``mlflow``: the tracking server of ``MLFLOW_TRACKING_URI`` (default ``./mlruns``), the
  experiment ``report_project`` (default ``MLFLOW_EXPERIMENT_NAME``), one run named after
  the Ray Train run, with the training settings as parameters.
- ``wandb``: project ``report_project`` (default ``WANDB_PROJECT``), mode from ``WANDB_MODE``
  (``offline`` works without a network), the settings as the run config.

A resumed run continues the same MLflow run or W&B run: their ids are stored in every
checkpoint. Points of steps after the checkpoint that the failed attempt had already sent are
sent again (MLflow keeps both values; W&B ignores steps it has seen). The environment
variables are read on the rank-0 worker: on a remote cluster set them for the job (``ray job
submit --runtime-env-json '{"env_vars": {...}}'``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from nexus.errors import NexusError

#: tracker -> (module it needs, pip extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: list[str]) -> None:
    """One-line error for an unknown tracker or one whose library is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise NexusError(f"unknown tracker '{name}' in report_to; choose from {', '.join(TRACKERS)}")
        module, extra = TRACKERS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module stubbed out in sys.modules
            found = False
        if not found:
            raise NexusError(
                f"report_to names {name}, but {module} is not installed: pip install 'nexus-moe[{extra}]'"
            )


def tensorboard_dir(storage_path: str, run_name: str) -> str:
    """Where rank 0 writes TensorBoard events while training (a path or a URI)."""
    return f"{storage_path.rstrip('/')}/{run_name}/{TENSORBOARD_DIR}"


def copy_logs(src: str, dst: Path) -> None:
    """Copy the event files of ``src`` (a path or URI) into ``dst``, if any were written."""
    from nexus.util.artifacts import is_uri

    if is_uri(src):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(src)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            pyarrow.fs.copy_files(src, str(dst))
    elif Path(src).is_dir():
        shutil.copytree(src, dst)


class _TensorBoard:
    def __init__(self, log_dir: str, start: int, **_) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run logs from step start + 1: TensorBoard hides what a failed attempt had
        # logged from there on (a fresh run logs from step 0, the first evaluation)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start + 1 if start else 0, flush_secs=10)
        self.id = None

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_name: str, settings: dict, run_id: str | None, project: str | None, **_) -> None:
        import mlflow

        if run_id is None and project:
            mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        if run_id is None:
            mlflow.log_params({k: str(v)[:500] for k, v in settings.items()})
        self.id = self.run.info.run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(values, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        import mlflow

        mlflow.end_run()


class _Wandb:
    def __init__(self, run_name: str, settings: dict, run_id: str | None, project: str | None, **_) -> None:
        import wandb

        self.run = wandb.init(
            project=project, name=run_name, id=run_id, resume="allow" if run_id else None, config=settings
        )
        self.id = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Trackers:
    """The trackers of one training worker (none on ranks other than 0)."""

    def __init__(self, backends: dict | None = None) -> None:
        self.backends = backends or {}

    @classmethod
    def open(
        cls,
        names: list[str],
        *,
        rank: int,
        log_dir: str | None,
        run_name: str,
        settings: dict,
        start: int,
        ids: dict | None = None,
        project: str | None = None,
    ) -> Trackers:
        """Start every tracker in ``names`` on rank 0, continuing the runs in ``ids`` (from a
        checkpoint) when resuming; other ranks get an empty set."""
        if rank != 0:
            return cls()
        ids = ids or {}
        return cls(
            {
                name: _BACKENDS[name](
                    log_dir=log_dir,
                    start=start,
                    run_name=run_name,
                    settings=settings,
                    run_id=ids.get(name),
                    project=project,
                )
                for name in names
            }
        )

    def log(self, row: dict) -> None:
        """One metrics.jsonl row: every numeric field but ``step``, at ``step``."""
        values = {
            k: float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for backend in self.backends.values():
            backend.log(int(row["step"]), values)

    def flush(self) -> None:
        for backend in self.backends.values():
            backend.flush()

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()

    @property
    def ids(self) -> dict:
        """Run ids to store in a checkpoint, so a resumed run continues the same tracker runs."""
        return {name: b.id for name, b in self.backends.items() if b.id is not None}
