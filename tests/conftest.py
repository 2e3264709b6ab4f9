"""Shared fixtures: tiny models, and one Ray runtime for the whole test session.

Ray is started once (a ``ray.cluster_utils.Cluster`` head node) and every test that needs it
uses the ``ray_cluster`` fixture; tests that need a second node add one and remove it again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local harness tasks read local files only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Train's controller looks at its workers every 2 s (reports, checkpoints, the end of a run):
# the tests' runs take seconds, so each waited for several of those polls (measured: 6 s of a
# 31 s one-worker run). Polling every 0.1 s runs the same code; Ray passes the setting on to the
# controller, and job subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["fixtures_demo"]

ROOT = Path(__file__).resolve().parents[1]

#: ``NEXUS_EXTENDED=1 ./dev test`` also runs the ``extended`` tests: more families and cases of
#: checks whose code path a default test already runs end to end (e.g. FSDP against DDP on
#: Qwen3-MoE and DeepSeek-V3 beside GPT-OSS). They keep the default suite inside its time budget.
EXTENDED = os.environ.get("NEXUS_EXTENDED") == "1"


def pytest_collection_modifyitems(config, items):
    if EXTENDED:
        return
    skip = pytest.mark.skip(reason="extended: NEXUS_EXTENDED=1 ./dev test runs it")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A Ray cluster with one head node (4 logical CPUs), shared by the whole session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "object_store_memory": 256 * 1024**2, "include_dashboard": False},
    )
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-OSS model directory with a tokenizer (session-wide, read-only)."""
    from model_dirs import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_gpt_oss"))
