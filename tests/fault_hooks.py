"""Ray ``worker_process_setup_hook`` used by tests/test_faults.py (runs in Ray workers).

``pause_training`` makes the training step numbered ``NEXUS_TEST_PAUSE_STEP`` (0-based)
block for ten minutes, so a test can kill the job's driver at a known point: after the
checkpoint before that step, while training is still running. It is installed only in the
job that the test starts in a subprocess (through that job's runtime environment), and it
patches ``nexus.stages.train.loop`` only in processes that import it (the training workers), so
other workers do not pay for importing torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

MODULE = "nexus.stages.train.loop"


def _patch(loop) -> None:
    pause_at = int(os.environ["NEXUS_TEST_PAUSE_STEP"])
    inject = loop._maybe_inject_fault

    def paused(fault, step, rank):
        if step == pause_at:
            time.sleep(600)
        return inject(fault, step, rank)

    loop._maybe_inject_fault = paused


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def pause_training() -> None:
    if MODULE in sys.modules:
        _patch(sys.modules[MODULE])
    else:
        sys.meta_path.insert(0, _PatchOnImport())
