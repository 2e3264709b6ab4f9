"""The built-in demo: a corpus from Python's own standard library, a byte-level BPE
tokenizer, and a small GPT-OSS-architecture MoE base model pretrained here on CPU.

    from nexus.demo import ensure_demo
    corpus_dir, model_dir = ensure_demo()   # builds once (minutes), then reuses the cache

Modules: :mod:`nexus.demo.corpus` (gathering and splits), :mod:`nexus.demo.tokenizer`,
:mod:`nexus.demo.pretrain` (model sizes, training, evaluation). ``docs/demo.md`` explains
the split and records the measured numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

__all__ = ["default_cache_dir", "ensure_corpus", "ensure_demo"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$NEXUS_CACHE`` if set, else ``~/.cache/nexus``."""
    env = os.environ.get("NEXUS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nexus"


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the demo cache, so concurrent callers build once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _demo_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() / "demo" if cache_dir is not None else default_cache_dir() / "demo"


def _corpus_ok(path: Path, sha: str) -> bool:
    from nexus.demo.corpus import SPLITS
    from nexus.errors import NexusError

    try:
        from nexus.demo.corpus import read_manifest

        manifest = read_manifest(path)
    except NexusError:
        return False
    files = [path / f"{s}.{ext}" for s in SPLITS for ext in ("jsonl", "parquet")]
    return manifest.get("content_sha256") == sha and all(f.is_file() for f in files)


def _model_ok(path: Path, key: str) -> bool:
    from nexus.demo.pretrain import read_metadata
    from nexus.errors import NexusError

    try:
        metadata = read_metadata(path)
    except NexusError:
        return False
    return metadata.get("build_key") == key and any(path.glob("*.safetensors"))


def ensure_corpus(cache_dir: str | os.PathLike | None = None, corpus=None) -> Path:
    """The demo corpus directory in the cache, written if missing (keyed by its content hash)."""
    from nexus.demo.corpus import gather_corpus, write_corpus

    corpus = corpus if corpus is not None else gather_corpus()
    root = _demo_root(cache_dir)
    out = root / f"corpus-{corpus.sha256[:16]}"
    if _corpus_ok(out, corpus.sha256):
        return out
    with _lock(root):
        if not _corpus_ok(out, corpus.sha256):
            log.info("writing the demo corpus to %s", out)
            write_corpus(corpus, out, overwrite=True)
    return out


def ensure_demo(
    size: str = "small",
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    format: str = "float32",
) -> tuple[Path, Path]:
    """Build or reuse the demo corpus and demo base model; returns ``(corpus_dir, model_dir)``.

    Both live under ``<cache_dir>/demo/`` (default ``$NEXUS_CACHE`` or ``~/.cache/nexus``),
    named by a hash of their inputs: the corpus by its content, the model by corpus content,
    size recipe, seed and code version. A cached model is reused as is; anything missing or
    stale is rebuilt (``small``: a few minutes on a 2-core CPU; ``tiny``: seconds).

    ``format="mxfp4"``: the same base with its experts in MXFP4 as the published GPT-OSS
    checkpoints store them, quantised from the cached ``float32`` base (built first if
    needed) into a directory of its own, keyed by the base's key and the format.
    """
    from nexus.demo.corpus import gather_corpus
    from nexus.demo.pretrain import build_demo_model, build_key, check_format, size_config

    size_config(size)  # one-line error for an unknown size, before any work
    check_format(format)
    corpus = gather_corpus()
    corpus_dir = ensure_corpus(cache_dir, corpus)
    key = build_key(corpus.sha256, size, seed)
    root = _demo_root(cache_dir)
    model_dir = root / f"model-{size}-seed{seed}-{key[:16]}"
    build = partial(build_demo_model, size=size, seed=seed, corpus=corpus, overwrite=True, progress=progress)
    _cached(root, model_dir, key, build, f"the demo base model (size {size})")
    if format == "mxfp4":
        from nexus.demo.pretrain import mxfp4_build_key, write_mxfp4_demo

        mxfp4_key = mxfp4_build_key(key)
        mxfp4_dir = root / f"{model_dir.name}-mxfp4-{mxfp4_key[:16]}"
        write = partial(write_mxfp4_demo, model_dir, corpus=corpus, overwrite=True)
        _cached(root, mxfp4_dir, mxfp4_key, write, "the MXFP4 demo base model")
        return corpus_dir, mxfp4_dir
    return corpus_dir, model_dir


def _cached(root: Path, model_dir: Path, key: str, build, what: str) -> None:
    """Reuse ``model_dir`` if it holds build ``key``, else ``build(model_dir)`` under the lock."""
    if _model_ok(model_dir, key):
        log.info("reusing %s %s", what, model_dir)
        return
    with _lock(root):
        if not _model_ok(model_dir, key):
            log.info("building %s into %s", what, model_dir)
            build(model_dir)
