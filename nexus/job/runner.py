"""Resumable stages: each writes ``<output>/<stage>/`` atomically with a manifest.

A stage's fingerprint hashes its own config section, the fingerprints *and run ids* of the
stages it reads, the identity of its external inputs (model config and weights list, corpus
files' names/sizes/mtimes) and the package version. A rerun skips every stage whose manifest
carries the same fingerprint; a changed setting changes that stage's fingerprint and, in
turn, every downstream one. Every execution of a stage gets a fresh run id, so a stage that
ran again (forced, or because its artifact was deleted) also reruns everything downstream of
it, even when its settings did not change. The manifest is written last, inside the
temporary directory, so a stage that died half-way never looks finished.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nexus.util.artifacts import atomic_dir, claim, claims_released, read_json, sha256_json, write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class Stage:
    """One pipeline stage."""

    name: str
    #: stages whose artifacts this one reads
    deps: list[str]
    #: the settings that determine this stage's output
    settings: Callable[[], dict]
    #: writes the artifact into the directory it is given (and gets the stage's fingerprint,
    #: which training uses to name its resumable Ray Train run)
    run: Callable[[Path, str], None]
    #: identities of external inputs (computed only when the stage is considered)
    inputs: Callable[[], dict] = field(default=lambda: {})
    enabled: bool = True


@dataclass
class StageResult:
    name: str
    status: str  # "up to date", "ran", "skipped"
    seconds: float = 0.0
    path: Path | None = None


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path, "stage manifest")
    except Exception:
        return None


@claims_released()
def run_stages(
    stages: list[Stage],
    output: Path,
    *,
    force: set[str] = frozenset(),
    version: str = "",
    on_done: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Run ``stages`` in order, skipping those whose manifest matches; returns what happened.

    ``force`` names stages to run even when they are up to date; everything downstream of a
    stage that ran follows (its upstream run id changed). ``on_done(name)`` is called after
    a stage ran (the job mirrors it to a URI output there). ``output`` is claimed for the whole
    run (:func:`nexus.util.artifacts.claim`): a second job writing there is refused at once.
    """
    output.mkdir(parents=True, exist_ok=True)
    claim(output)
    fingerprints: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    results: list[StageResult] = []
    for stage in stages:
        directory = output / stage.name
        if not stage.enabled:
            results.append(StageResult(stage.name, "skipped"))
            continue
        record = {
            "stage": stage.name,
            "settings": stage.settings(),
            "inputs": stage.inputs(),
            "upstream": {
                d: {"fingerprint": fingerprints[d], "run": run_ids[d]}
                for d in stage.deps
                if d in fingerprints
            },
            "version": version,
        }
        fingerprint = sha256_json(record)
        fingerprints[stage.name] = fingerprint
        manifest = read_manifest(directory)
        if stage.name not in force and manifest and manifest.get("fingerprint") == fingerprint:
            run_ids[stage.name] = str(manifest.get("run", ""))
            log.info("[%s] up to date (%s)", stage.name, directory)
            results.append(StageResult(stage.name, "up to date", path=directory))
            continue
        log.info("[%s] running -> %s", stage.name, directory)
        t0 = time.perf_counter()
        run_id = uuid.uuid4().hex
        with atomic_dir(directory, overwrite=True) as tmp:
            stage.run(tmp, fingerprint)
            seconds = time.perf_counter() - t0
            write_json(
                tmp / MANIFEST,
                {**record, "fingerprint": fingerprint, "run": run_id, "seconds": round(seconds, 2)},
            )
        run_ids[stage.name] = run_id
        log.info("[%s] done in %.1fs", stage.name, seconds)
        if on_done is not None:
            on_done(stage.name)
        results.append(StageResult(stage.name, "ran", seconds, directory))
    return results
