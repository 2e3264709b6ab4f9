"""Corpus reading: speed of ``read_corpus`` on the demo corpus, and fingerprints of what the
stages see, which a change to the readers must leave identical.

Part 1, speed: every demo split as Parquet and as JSON Lines, read to the end through
:func:`nexus.data.corpus.read_corpus` (documents and MB of text per second, best of
``--repeats``), side by side with Ray Data's own readers on the same file
(``ray.data.read_parquet(columns=[text])`` / ``ray.data.read_json(lines=True)``), which is
how NEXUS read corpora before it read them line by line. The demo's documents are long
(2 KB on average); ``--synthetic-docs`` short ones (~100 bytes, as JSON Lines and as text,
against ``ray.data.read_json`` / ``ray.data.read_text``) show the cost per line.

Part 2, fingerprints (SHA-256, first 16 hex digits) of: the documents in order and the
sizes of the Ray blocks they come in, per file; the packed training blocks of ``nexus
train`` / ``nexus evaluate`` (:func:`nexus.stages.train.data.packed_dataset`); the sample of
``nexus sample`` (the demo job's settings: budget 100,000 tokens, documents capped at 4,096
tokens); the token stream ``nexus collect`` takes from that sample (seq_len 256, 100,000
tokens). Run it before and after a change and compare the ``fingerprints`` sections.

    python benchmarks/corpus_read.py --corpus-dir DIR --model DIR --json benchmarks/results/corpus_read.json

``--corpus-dir``: a ``nexus demo-corpus`` output (default: the cached demo corpus, built on
first use); ``--model``: any model directory with a tokenizer (default: the small demo base).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPLITS = ("domain", "general", "domain_heldout", "general_heldout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus-dir", default=None, help="a `nexus demo-corpus` output directory")
    p.add_argument("--model", default=None, help="model directory whose tokenizer is used")
    p.add_argument("--size", default="small", help="demo size when --corpus-dir/--model are not given")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--synthetic-docs", type=int, default=200_000, help="short documents per synthetic file")
    p.add_argument("--skip-fingerprints", action="store_true")
    p.add_argument("--json", default="benchmarks/results/corpus_read.json")
    return p.parse_args(argv)


def _sha(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _drain(ds) -> tuple[int, int]:
    """(documents, bytes of text) of a dataset with a ``text`` column, read to the end."""
    import pyarrow.compute as pc

    docs = nbytes = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        docs += batch.num_rows
        nbytes += pc.sum(pc.binary_length(batch.column("text"))).as_py() or 0
    return docs, nbytes


def _best(fn, repeats: int) -> tuple[float, tuple[int, int]]:
    best, out = float("inf"), (0, 0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _synthetic(directory: Path, docs: int) -> list[str]:
    """Short documents as JSON Lines and as text, in ``directory``."""
    texts = [
        f"synthetic document {i} with a few words of text, " + "abcdefgh " * (i % 7) for i in range(docs)
    ]
    (directory / "synthetic.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (directory / "synthetic.txt").write_text("".join(t + "\n" for t in texts))
    return [str(directory / "synthetic.jsonl"), str(directory / "synthetic.txt")]


def speed_part(corpus_dir: Path, repeats: int, synthetic: list[str]) -> list[dict]:
    import ray

    from nexus.data.corpus import read_corpus

    files = [str(corpus_dir / f"{split}.{ext}") for split in SPLITS for ext in ("parquet", "jsonl")]
    rows = []
    for path in files + synthetic:
        ext = path.rsplit(".", 1)[1]

        def ray_own(path=path, ext=ext):
            if ext == "parquet":
                return _drain(ray.data.read_parquet(path).select_columns(["text"]))
            if ext == "txt":
                return _drain(ray.data.read_text(path))
            return _drain(ray.data.read_json(path, lines=True).select_columns(["text"]))

        new_s, (docs, nbytes) = _best(lambda path=path: _drain(read_corpus(path)), repeats)
        old_s, _ = _best(ray_own, repeats)
        row = {
            "file": Path(path).name,
            "docs": docs,
            "mb": round(nbytes / 1e6, 2),
            "read_corpus_s": round(new_s, 3),
            "ray_reader_s": round(old_s, 3),
            "read_corpus_mb_per_s": round(nbytes / 1e6 / new_s, 1),
            "ray_reader_mb_per_s": round(nbytes / 1e6 / old_s, 1),
            "ratio": round(new_s / old_s, 2),
        }
        rows.append(row)
        print(
            f"{row['file']:<26} {docs:>6} docs {row['mb']:>6.2f} MB  read_corpus {new_s:6.3f}s "
            f"({row['read_corpus_mb_per_s']:>6.1f} MB/s)  ray reader {old_s:6.3f}s "
            f"({row['ray_reader_mb_per_s']:>6.1f} MB/s)  ratio {row['ratio']:.2f}",
            flush=True,
        )
    return rows


def fingerprint_part(corpus_dir: Path, model: Path) -> dict:
    import numpy as np
    import ray

    from nexus.data.corpus import read_corpus, tokenize_corpus
    from nexus.stages.collect import sequences_hash, take_sequences
    from nexus.stages.evaluate import packed_blocks
    from nexus.stages.sample import sample
    from nexus.stages.train.data import packed_dataset

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    out: dict = {"files": {}}
    for split in SPLITS:
        for ext in ("parquet", "jsonl"):
            name = f"{split}.{ext}"
            batches = list(
                read_corpus(corpus_dir / name).iter_batches(batch_format="pyarrow", batch_size=None)
            )
            texts = [t for b in batches for t in b.column("text").to_pylist()]
            out["files"][name] = {
                "docs": len(texts),
                "texts": _sha(t.encode() for t in texts),
                "blocks": [b.num_rows for b in batches if b.num_rows],
            }
    for ext in ("parquet", "jsonl"):
        ds = packed_dataset([str(corpus_dir / f"domain.{ext}")], str(model), seq_len=256)
        blocks = np.concatenate(
            [b["input_ids"] for b in ds.iter_batches(batch_format="numpy", batch_size=None)]
        )
        out[f"train_blocks_domain_{ext}"] = {"blocks": len(blocks), "sha": _sha([blocks.tobytes()])}
        held = packed_blocks([str(corpus_dir / f"domain_heldout.{ext}")], str(model), 256, 32768)
        out[f"evaluate_blocks_domain_heldout_{ext}"] = {
            "blocks": len(held),
            "sha": _sha([held.numpy().tobytes()]),
        }
    with tempfile.TemporaryDirectory() as tmp:
        report = sample(
            corpus_dir / "domain.parquet", model, Path(tmp) / "sample", 100_000, max_doc_tokens=4096
        )
        out["sample"] = {
            "sample_hash": report["sample_hash"],
            "sample": report["sample"],
            "pool": report["pool"],
        }
        tds = tokenize_corpus(
            read_corpus(Path(tmp) / "sample"), str(model), max_doc_tokens=256, split_long=True
        )
        seqs, _ = take_sequences(tds, 100_000)
        out["collect_sequences"] = {"sequences": len(seqs), "sha": sequences_hash(seqs)[:16]}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks.methods import start_ray

    if args.corpus_dir and args.model:
        corpus_dir, model = Path(args.corpus_dir), Path(args.model)
    else:
        from nexus.demo import ensure_demo

        demo_corpus, demo_model = ensure_demo(args.size, progress=False)
        corpus_dir, model = Path(args.corpus_dir or demo_corpus), Path(args.model or demo_model)
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = _synthetic(Path(tmp), args.synthetic_docs) if args.synthetic_docs else []
        result = {
            "command": "python benchmarks/corpus_read.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.platform(),
            "corpus_dir": str(corpus_dir),
            "model": str(model),
            "speed": speed_part(corpus_dir, args.repeats, synthetic),
        }
    if not args.skip_fingerprints:
        result["fingerprints"] = fingerprint_part(corpus_dir, model)
        print(json.dumps(result["fingerprints"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
