"""Faults injected from the test side, into the processes that run the work (the product has no
test hooks).

Two ways in:

- In the test's own Ray session, a test monkeypatches the class or function the stage hands to
  Ray (``RouterCollector``, ``train_loop_per_worker``) with one from here. This module is
  registered with Ray's cloudpickle *by value*, so the replacement travels to the worker
  processes with the task, whatever their ``sys.path``.
- In a job the test starts in a subprocess, Ray's ``worker_process_setup_hook`` runs
  :func:`pause_training` in every worker of that job (through the job's runtime environment).

Training faults fire at an optimizer step: at the start of step ``s`` (0-based) the scheduler
has taken ``s`` steps (``scheduler.last_epoch == s``), in a fresh run and in a resumed one alike.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOOP = "nexus.stages.train.loop"


# -- collection ---------------------------------------------------------------------------------


def slow_collector(delay_s: float, marker_dir: str) -> type:
    """A ``RouterCollector`` that leaves a file named after its node in ``marker_dir`` for every
    batch it starts, then takes ``delay_s`` longer: a test can remove a node while it is busy."""
    from nexus.stages.collect import RouterCollector

    class SlowCollector(RouterCollector):
        def __call__(self, batch):
            Path(marker_dir, f"{self.node}-{os.getpid()}-{time.monotonic_ns()}").touch()
            time.sleep(delay_s)
            return super().__call__(batch)

    return SlowCollector


# -- training -------------------------------------------------------------------------------------


def _at_step(action) -> None:
    """Patch the training loop's ``optimizer_step`` (in this process) to call ``action(step)`` first."""
    loop = importlib.import_module(LOOP)
    step_fn = loop.optimizer_step

    def optimizer_step(model, student, micro_batches, cfg, optimizer, scheduler, *args, **kwargs):
        action(scheduler.last_epoch)
        return step_fn(model, student, micro_batches, cfg, optimizer, scheduler, *args, **kwargs)

    loop.optimizer_step = optimizer_step


def _lists_a_checkpoint(snapshot: Path) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):  # not there yet, or being written
        return False


def failing_training(
    step: int, rank: int, mode: str, marker: str, await_checkpoint: str | None = None, wait_s: float = 0
):
    """A ``train_loop_per_worker`` that fails once, on ``rank`` at ``step``: ``raise`` (an exception
    in the worker) or ``exit`` (the worker process dies, ``os._exit``). ``marker`` (a file) makes
    it once: a restarted worker sees it and goes on.

    Ray Train commits a checkpoint only once its controller has collected every rank's report
    of it (it polls every 2 s; 0.1 s in the tests), so a test that needs the fault to land after a checkpoint names
    the run directory in ``await_checkpoint``: the fault waits until the run's checkpoint
    manager snapshot lists one, then ``wait_s`` seconds more.
    """

    def fail(at: int) -> None:
        import ray.train

        if at != step or ray.train.get_context().get_world_rank() != rank or Path(marker).exists():
            return
        Path(marker).write_text(str(at))
        if await_checkpoint:
            snapshot = Path(await_checkpoint) / "checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not _lists_a_checkpoint(snapshot):
                time.sleep(0.2)
        time.sleep(wait_s)
        if mode == "exit":
            os._exit(1)
        raise RuntimeError(f"injected training fault at step {at}")

    def train_loop_per_worker(config: dict) -> None:
        _at_step(fail)
        importlib.import_module(LOOP).train_loop_per_worker(config)

    return train_loop_per_worker


# -- the job's driver -------------------------------------------------------------------------------


def _pause(at: int) -> None:
    if at == int(os.environ["NEXUS_TEST_PAUSE_STEP"]):
        time.sleep(600)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch the training loop when a process imports it (only training workers do)."""

    def find_spec(self, name, path, target=None):
        if name != LOOP:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _at_step(_pause)

        spec.loader.exec_module = exec_module
        return spec


def pause_training() -> None:
    """``worker_process_setup_hook``: training step ``NEXUS_TEST_PAUSE_STEP`` blocks for ten
    minutes, so a test can kill the job's driver at a known point: after the checkpoint before
    that step, while training is still running. Other workers do not import torch for it."""
    if LOOP in sys.modules:
        _at_step(_pause)
    else:
        sys.meta_path.insert(0, _PatchOnImport())
