"""Demo fixtures: the built-in corpus and the tiny demo base model, built once per test session.

``demo_tiny`` is ``(corpus_dir, model_dir)``: a corpus written by ``nexus demo-corpus`` and a
``tiny`` model written by ``nexus demo-model --size tiny --seed 0`` (both through the CLI's
main function). Treat both as read-only; copy them to change anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory) -> tuple[Path, Path]:
    from nexus.cli import main

    root = tmp_path_factory.mktemp("demo_tiny")
    corpus_dir, model_dir = root / "corpus", root / "model"
    assert main(["demo-corpus", "--output", str(corpus_dir)]) == 0
    rc = main(
        [
            "demo-model",
            "--size",
            "tiny",
            "--seed",
            "0",
            "--corpus",
            str(corpus_dir),
            "--output",
            str(model_dir),
            "--no-progress",
        ]
    )
    assert rc == 0
    return corpus_dir, model_dir


@pytest.fixture(scope="session")
def demo_tiny_mxfp4(demo_tiny, tmp_path_factory) -> Path:
    """The tiny demo base with its experts in MXFP4, written by ``nexus demo-model --size tiny
    --seed 0 --mxfp4`` (the same base as ``demo_tiny``'s, quantised, not retrained). Read-only."""
    from nexus.cli import main

    corpus_dir, _ = demo_tiny
    out = tmp_path_factory.mktemp("demo_tiny_mxfp4") / "model"
    argv = ["demo-model", "--size", "tiny", "--seed", "0", "--corpus", str(corpus_dir), "--output", str(out)]
    assert main([*argv, "--mxfp4", "--no-progress"]) == 0
    return out
