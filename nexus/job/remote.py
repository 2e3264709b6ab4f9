"""Job outputs on object stores (``s3://``, ``gs://``, ``hdfs://``, ``file://`` ...).

Stages write atomically with local renames, which object stores do not have. When
``output`` is a URI the job therefore works in a local staging directory and mirrors it:
before running it pulls the finished stages from the URI (so a rerun anywhere skips them),
and after each stage it pushes that stage's directory, **manifest last**: a stage counts as
finished remotely only once its manifest is there, so an interrupted upload never looks done.
The exported merged checkpoint (large) is pushed but not pulled back.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from nexus.demo import default_cache_dir
from nexus.errors import NexusError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_NOT_PULLED = ("export", ".ray")


class RemoteOutput:
    """A URI output directory mirrored through a local staging directory."""

    def __init__(self, uri: str, staging_root: Path | None = None) -> None:
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri.rstrip("/"))
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for unknown schemes
            raise NexusError(f"cannot open output URI {uri}: {exc}") from None
        self.uri = uri.rstrip("/")
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.local = (staging_root or default_cache_dir() / "staging") / key
        self.local.mkdir(parents=True, exist_ok=True)

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def pull(self) -> None:
        """Copy every finished remote stage (one with a manifest) into the staging directory."""
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return
        for entry in self.fs.get_file_info(pafs.FileSelector(self.root)):
            name = entry.base_name
            if entry.type != pafs.FileType.Directory or name in _NOT_PULLED or name.startswith("."):
                continue
            if self.fs.get_file_info(self._remote(f"{name}/{MANIFEST}")).type == pafs.FileType.NotFound:
                continue
            target = self.local / name
            if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == self._read(
                f"{name}/{MANIFEST}"
            ):
                continue
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            pafs.copy_files(
                self._remote(name),
                str(target),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
            log.info("pulled %s/%s", self.uri, name)

    def _read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._remote(rel)) as f:
            return f.read()

    def push(self, rel: str) -> None:
        """Upload ``rel`` (a stage directory or a file) from staging, a stage's manifest last."""
        local = self.local / rel
        remote = self._remote(rel)
        if local.is_file():
            self.fs.create_dir(str(Path(remote).parent), recursive=True)
            pafs.copy_files(
                str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
            return
        if self.fs.get_file_info(remote).type != pafs.FileType.NotFound:
            self.fs.delete_dir(remote)
        self.fs.create_dir(remote, recursive=True)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for f in sorted(files, key=lambda p: p.name == MANIFEST):
            dst = f"{remote}/{f.relative_to(local).as_posix()}"
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(
                str(f), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
        log.info("pushed %s to %s/%s", rel, self.uri, rel)
