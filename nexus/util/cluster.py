"""Ray helpers: starting or joining Ray the same way everywhere, resource checks.

``ray job submit`` sets ``RAY_ADDRESS`` and ``ray.init()`` joins that cluster (so does an
explicit ``RAY_ADDRESS=auto`` or ``RAY_ADDRESS=host:port`` next to a ``ray start`` head).
Without ``RAY_ADDRESS`` a plain ``python jobs/specialize.py`` always starts its own local
instance (``address="local"``): plain ``ray.init()`` would silently join whatever Ray
instance happens to run on the machine (another user's job, a test session) and die with
it. Tests start one Ray runtime per session and every stage reuses it.
"""

from __future__ import annotations

import logging
import os

import ray

from nexus.errors import NexusError
from nexus.util.artifacts import is_uri

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """Initialise Ray once (joining ``address``/``RAY_ADDRESS`` if given, else local)."""
    if ray.is_initialized():
        return
    kwargs: dict = {
        "ignore_reinit_error": True,
        "log_to_driver": os.environ.get("NEXUS_RAY_LOGS", "1") == "1",
    }
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    log.debug("ray initialised: %s", ray.cluster_resources())


def gib(gb: float) -> int:
    """Bytes of ``gb`` GiB, for Ray's ``memory`` requests."""
    return int(gb * 1024**3)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def check_gpus(
    requested: float, what: str, fix: str = "use --gpus-per-worker 0 (CPU) or add GPU nodes"
) -> None:
    """Refuse GPU requests the cluster cannot satisfy (instead of hanging forever)."""
    if requested and requested > 0:
        available = cluster_gpus()
        if available < requested:
            raise NexusError(
                f"{what} asks for {requested:g} GPU(s) but the Ray cluster has {available:g}; {fix}"
            )


def warn_if_local_storage_on_cluster(storage_path: str) -> None:
    """Multi-node training needs checkpoints on storage every node sees (NFS, S3, GCS...)."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 and not is_uri(storage_path):
        log.warning(
            "the Ray cluster has %d nodes but the training storage path %s is local; multi-node training "
            "needs shared storage (an NFS path mounted on every node, or s3://, gs://, ... URIs)",
            len(alive),
            storage_path,
        )
