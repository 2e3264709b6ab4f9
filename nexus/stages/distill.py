"""Offline distillation: the ``distill`` stage.

Online KD runs a teacher forward (the frozen base) in every training step. The teacher never
changes, so this stage runs it once, over exactly the token blocks training will consume, and
stores per predicted position the teacher's top-k token ids, their log-probabilities and the
log of the remaining mass (:func:`teacher_topk`); training with ``kd: offline`` then reads
these rows beside its blocks and runs no teacher forward (the KL is exact on the top-k and
treats the rest as one bucket, :func:`nexus.stages.train.losses.offline_kl`).

Which blocks: training's own data code (:func:`nexus.stages.train.data.packed_dataset`) packs
the corpus with training's ``seq_len`` and ``max_doc_tokens``; a run of ``steps`` optimizer
steps reads the first ``batch_size x grad_accum x train_workers x steps`` blocks (all of them
when it cycles), in the dataset's fixed order. This stage covers that prefix. Each teacher
row carries its block index and a digest of the block's tokens, so training checks, block by
block, that every teacher row belongs to the block it is read with.

How: the driver cuts the blocks into forward batches of training's micro-batch size, one
batch per row of a Ray Dataset, and a class-based ``map_batches`` UDF
(:class:`TeacherScorer`, one model per actor, packed experts where the checkpoint has them)
scores them. Batches are fixed by the driver and come back in order (``preserve_order``), so
the shards are the same bytes whatever the number of actors. The driver writes them as Parquet
shards (``teacher-00000.parquet``...) with ``manifest.json``, atomically.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from nexus import __version__
from nexus.config import CorpusFormat, ExpertsLayout, ModelDtype, RemoteCode, input_, setting
from nexus.data.arrow import list_rows
from nexus.data.corpus import corpus_record, resolve_corpus, skipped_documents
from nexus.errors import NexusError, user_errors
from nexus.models.identity import check_identity, model_identity
from nexus.models.loading import load_config, load_model, resolve_experts
from nexus.stages.train.data import block_digest, blocks_consumed, packed_dataset, packing
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, read_json, write_json
from nexus.util.cluster import check_gpus, ensure_ray, gib
from nexus.util.preflight import check_seq_len, check_weights

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
KIND = "nexus-teacher-topk"
#: sequence positions per vocabulary projection (the teacher's logits are never whole-sequence)
CHUNK = 256


class DistillConfig(ModelDtype, ExpertsLayout, CorpusFormat, RemoteCode):
    """``nexus distill``: the frozen base's top-k log-probabilities over training's blocks."""

    model: str = input_(help="base model directory (readable on every worker node)", identity="model")
    corpus: list[str] = input_(
        help="training corpus: files, directories, globs or URIs (text, JSONL, Parquet)", identity="corpus"
    )
    output: str = input_(help="output directory: teacher-*.parquet shards and manifest.json")
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    # -- the blocks training consumes: training's settings (the job copies them from `train:`)
    seq_len: int = input_(256, help="training's --seq-len", identity="value")
    max_doc_tokens: int | None = input_(4096, help="training's --max-doc-tokens", identity="value")
    batch_size: int = input_(
        8, help="training's --batch-size (also the teacher's forward batch)", identity="value"
    )
    grad_accum: int = input_(1, help="training's --grad-accum", identity="value")
    train_workers: int = input_(1, help="training's --workers", identity="value")
    kd_temperature: float = input_(
        1.0, help="training's --kd-temperature (T of the stored log-probabilities)", identity="value"
    )
    steps: int = input_(
        200, help="training's optimizer steps (--max-steps, or what --max-tokens gives)", identity="value"
    )
    # -- the teacher pass
    top_k: int = setting(32, help="teacher tokens kept per position (the rest is one bucket)", gt=0)
    workers: int = setting(1, help="teacher actors, one model each (spread them over spare machines)", gt=0)
    gpus_per_worker: float = setting(0.0, help="GPUs per actor (0: CPU; fractions share a GPU)", ge=0)
    cpus_per_worker: int = setting(
        1, fingerprint=False, help="CPU threads (and Ray CPUs) per CPU actor", gt=0
    )
    memory_gb: float | None = setting(
        None, fingerprint=False, help="memory Ray reserves per actor (GiB)", gt=0
    )
    shard_blocks: int = setting(1024, fingerprint=False, help="blocks per Parquet shard", gt=0)


def teacher_topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Top-k of ``log_softmax(logits / T)`` and the log of the mass outside it.

    Returns ``(ids int32, logp float32, rest float32)``; ``rest`` is the log-sum-exp of the
    other log-probabilities (exact, no ``log(1 - sum)`` cancellation), ``-inf`` when k covers
    the vocabulary.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids.to(torch.int32), top, rest


class TeacherScorer:
    """Ray Data class UDF: loads the frozen base once per actor and scores forward batches.

    Each input row is one forward batch: ``first`` (the index of its first block) and ``ids``
    (its blocks' tokens, concatenated). Each call returns one output row per block: ``block``,
    ``digest`` (:func:`~nexus.stages.train.data.block_digest`), ``top_ids``, ``top_logp``
    (flattened [seq_len - 1, k]) and ``rest`` ([seq_len - 1]).
    """

    def __init__(
        self,
        model: str,
        *,
        seq_len: int,
        top_k: int,
        temperature: float = 1.0,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
        experts: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.model = load_model(
            model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, experts=experts
        )
        self.device = torch.device(device)
        self.seq_len, self.top_k, self.temperature = seq_len, top_k, temperature

    @torch.no_grad()
    def score(self, blocks: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher top-k of ``blocks`` [B, S]: ids/logp [B, S-1, k], rest [B, S-1] (numpy)."""
        from nexus.stages.train.losses import lm_logits

        hidden = self.model.base_model(input_ids=blocks.to(self.device), use_cache=False).last_hidden_state
        hidden = hidden[:, :-1]
        parts = [
            teacher_topk(lm_logits(self.model, hidden[:, s : s + CHUNK]), self.top_k, self.temperature)
            for s in range(0, hidden.shape[1], CHUNK)
        ]
        return tuple(torch.cat(p, dim=1).cpu().numpy() for p in zip(*parts))

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for first, flat in zip(batch.column("first").to_pylist(), list_rows(batch, "ids", np.int32)):
            blocks = flat.reshape(-1, self.seq_len)
            ids, logp, rest = self.score(torch.from_numpy(blocks.astype(np.int64)))
            tables.append(teacher_table(first, blocks, ids, logp, rest))
        return pa.concat_tables(tables)


def _fixed_list(values: np.ndarray, rows: int) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.size // max(rows, 1))


def teacher_table(first: int, blocks: np.ndarray, ids, logp, rest) -> pa.Table:
    """Teacher rows of ``blocks`` (numbered from ``first``) as an Arrow table (one row per block)."""
    n = len(blocks)
    return pa.table(
        {
            "block": pa.array(np.arange(first, first + n, dtype=np.int64)),
            "digest": pa.array([block_digest(b) for b in blocks], pa.binary(16)),
            "top_ids": _fixed_list(ids, n),
            "top_logp": _fixed_list(logp, n),
            "rest": _fixed_list(rest, n),
        }
    )


def forward_batches(ds, blocks: int, batch_size: int) -> list[pa.Table]:
    """The first ``blocks`` blocks of a packed dataset as one-row tables of ``batch_size`` blocks."""
    tables, chunk, first, taken = [], [], 0, 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for row in np.asarray(batch["input_ids"], dtype=np.int32):
            if taken == blocks:
                break
            chunk.append(row)
            taken += 1
            if len(chunk) == batch_size:
                tables.append(_batch_row(first, chunk))
                first, chunk = taken, []
    if chunk:
        tables.append(_batch_row(first, chunk))
    return tables


def _batch_row(first: int, rows: list[np.ndarray]) -> pa.Table:
    flat = np.concatenate(rows)
    return pa.table(
        {
            "first": pa.array([first], pa.int64()),
            "ids": pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), pa.array(flat)),
        }
    )


def weights_hash(model_dir: str) -> str:
    """The job's cheap model fingerprint (config, weight files' names, sizes and mtimes)."""
    from nexus.job.run import model_identity_inputs

    return model_identity_inputs(model_dir).get("model_hash", model_dir)


def data_hash(digests) -> str:
    """SHA-256 over the blocks' token digests, in order."""
    h = hashlib.sha256()
    for d in digests:
        h.update(bytes(d))
    return h.hexdigest()


@claims_released()
def run(cfg: DistillConfig | None = None, /, **kwargs) -> Path:
    """Score training's blocks with the frozen base; write the shards and manifest to ``cfg.output``."""
    cfg = DistillConfig.build(cfg, **kwargs)
    claim_output(cfg.output, cfg.overwrite)
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    experts = resolve_experts(config, cfg.experts, model=cfg.model)
    check_seq_len(config, cfg.seq_len)
    check_weights(cfg.model)
    identity = model_identity(config)
    vocab = identity["vocab_size"]
    k = min(cfg.top_k, vocab)
    ensure_ray()
    check_gpus(cfg.workers * cfg.gpus_per_worker, f"distillation with {cfg.workers} worker(s)")
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if cfg.gpus_per_worker == 0 and cfg.workers * cfg.cpus_per_worker > cpus:
        raise NexusError(
            f"{cfg.workers} worker(s) x {cfg.cpus_per_worker} CPUs exceed the cluster's {cpus:g} CPUs; "
            "use fewer --workers or add nodes"
        )
    t0 = time.perf_counter()
    skipped = skipped_documents(cfg.skip_bad_documents)
    ds = packed_dataset(cfg.corpus, cfg.model, **packing(cfg, skipped))
    if skipped:
        skipped.finish()  # logs how many were skipped
    available = ds.count()
    needed = blocks_consumed(
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, workers=cfg.train_workers, steps=cfg.steps
    )
    blocks = min(available, needed)
    batches = forward_batches(ds, blocks, cfg.batch_size)
    gpus = cfg.gpus_per_worker
    out = ray.data.from_arrow(batches)
    out.context.execution_options.preserve_order = True
    out = out.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={
            "model": cfg.model,
            "seq_len": cfg.seq_len,
            "top_k": k,
            "temperature": cfg.kd_temperature,
            "dtype": cfg.dtype,
            "device": "cuda" if gpus > 0 else "cpu",
            "trust_remote_code": cfg.trust_remote_code,
            "experts": experts,
            "num_threads": None if gpus > 0 else cfg.cpus_per_worker,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_gpus=gpus or None,
        num_cpus=1 if gpus > 0 else cfg.cpus_per_worker,
        **({"memory": gib(cfg.memory_gb)} if cfg.memory_gb else {}),
    )
    t_first = None
    with user_errors("scoring blocks with the teacher"), atomic_dir(cfg.output, cfg.overwrite) as tmp:
        pending, shards, digests, written = [], [], [], 0
        outside = 0.0  # the teacher's probability mass outside its top-k, summed over positions
        for table in out.iter_batches(batch_format="pyarrow", batch_size=None):
            t_first = t_first or time.perf_counter()
            pending.append(table)
            digests.extend(table.column("digest").to_pylist())
            outside += float(np.exp(table.column("rest").combine_chunks().flatten().to_numpy()).sum())
            if sum(t.num_rows for t in pending) >= cfg.shard_blocks:
                written = _flush(pending, tmp, shards, cfg.shard_blocks, written)
        _flush(pending, tmp, shards, cfg.shard_blocks, written, last=True)
        if len(digests) != blocks:
            raise NexusError(
                f"the teacher scored {len(digests)} blocks but was sent {blocks}; a worker lost data"
            )
        elapsed = time.perf_counter() - t0
        tokens = blocks * (cfg.seq_len - 1)
        write_json(
            tmp / MANIFEST,
            {
                "kind": KIND,
                "nexus_version": __version__,
                "identity": identity,
                "model": cfg.model,
                "model_hash": weights_hash(cfg.model),
                "experts": experts,
                "dtype": cfg.dtype,
                "corpus": corpus_record(
                    cfg.corpus, resolve_corpus(cfg.corpus, cfg.corpus_format), cfg.text_field, cfg.text_unit
                ),
                "data_hash": data_hash(digests),
                "seq_len": cfg.seq_len,
                "max_doc_tokens": cfg.max_doc_tokens,
                "top_k": k,
                "vocab_size": vocab,
                "temperature": cfg.kd_temperature,
                "blocks": blocks,
                "blocks_available": available,
                "covers": {
                    "steps": cfg.steps,
                    "batch_size": cfg.batch_size,
                    "grad_accum": cfg.grad_accum,
                    "train_workers": cfg.train_workers,
                },
                "tokens": tokens,
                "bytes_per_token": bytes_per_token(k),
                # what the top-k leaves to the one "rest" bucket: near 0, offline KD is online KD
                "mean_mass_outside_top_k": round(outside / tokens, 6) if tokens else None,
                "shards": shards,
                "workers": cfg.workers,
                "gpus_per_worker": gpus,
                "elapsed_s": round(elapsed, 3),
                "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
                "steady_tokens_per_s": _steady(tokens, batches, t_first),
            },
        )
    log.info("scored %d blocks (%d tokens, top-%d) in %.1fs", blocks, tokens, k, elapsed)
    return Path(cfg.output)


def _steady(tokens: int, batches: list, t_first: float | None) -> float | None:
    """Tokens/s after the first batch came back (actors up, models loaded): the pass's own rate."""
    if t_first is None or len(batches) < 2:
        return None
    seconds = time.perf_counter() - t_first
    return round(tokens * (len(batches) - 1) / len(batches) / seconds, 1) if seconds > 0 else None


def _flush(pending: list, tmp: Path, shards: list, size: int, written: int, last: bool = False) -> int:
    """Write full shards of ``size`` rows from ``pending`` (and the remainder when ``last``)."""
    table = pa.concat_tables(pending) if pending else None
    pending.clear()
    while table is not None and (table.num_rows >= size or (last and table.num_rows)):
        name = f"teacher-{len(shards):05d}.parquet"
        pq.write_table(table.slice(0, size), tmp / name)
        shards.append(name)
        written += min(size, table.num_rows)
        table = table.slice(size) if table.num_rows > size else None
    if table is not None:
        pending.append(table)
    return written


def bytes_per_token(k: int) -> int:
    """Stored bytes per token: k ids (int32) and log-probabilities (float32), one remainder (float32)."""
    from nexus.planner.terms import teacher_bytes_per_token

    return teacher_bytes_per_token(k)


# -- what training reads -------------------------------------------------------------------------
def read_manifest(path: str) -> dict:
    manifest = read_json(Path(path) / MANIFEST, "distill manifest")
    if manifest.get("kind") != KIND:
        raise NexusError(f"{path} is not a `nexus distill` output (no teacher manifest); run `nexus distill`")
    return manifest


def check_matches(path: str, manifest: dict, cfg, config) -> None:
    """Refuse a distill output made for another model, temperature, seq_len or document cut."""
    fix = "rerun `nexus distill` with training's model and settings, or train with --kd online"
    check_identity(manifest["identity"], model_identity(config), f"the distill output {path}", fix)
    if manifest.get("model_hash") != weights_hash(cfg.model):
        raise NexusError(
            f"the distill output {path} was made from other weight files than {cfg.model}; {fix}"
        )
    for key, theirs in (
        ("seq_len", cfg.seq_len),
        ("max_doc_tokens", cfg.max_doc_tokens),
        ("temperature", cfg.kd_temperature),
    ):
        if manifest[key] != theirs:
            raise NexusError(
                f"the distill output {path} has {key}={manifest[key]} but training uses {theirs}; {fix}"
            )


def teacher_dataset(path: str, manifest: dict):
    """The teacher rows as a Ray Dataset, in block order (shards in the manifest's order)."""
    files = [str(Path(path) / name) for name in manifest["shards"]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise NexusError(f"the distill output {path} lacks {missing[0]}; rerun `nexus distill`")
    return ray.data.read_parquet(files, shuffle=None)


def aligned_dataset(train_ds, path: str, manifest: dict, needed: int):
    """Training's first blocks zipped with their teacher rows (materialised, fixed order).

    The prefix training reads (``needed`` blocks, or all when it cycles) must be covered, and
    each of its blocks' token digests must equal the teacher row's: checked here, on the
    driver, so a distill output for other data fails before any worker starts; the workers
    check every row again as they read it (:func:`~nexus.stages.train.data.rank_teacher_batches`).
    """
    available = train_ds.count()
    blocks = min(available, needed)
    if manifest["blocks"] < blocks:
        raise NexusError(
            f"the distill output {path} covers {manifest['blocks']} blocks but training reads {blocks}; "
            "rerun `nexus distill` with training's --steps, --batch-size, --grad-accum and --workers"
        )
    teacher = teacher_dataset(path, manifest)
    head = train_ds.limit(blocks).materialize()
    with user_errors("reading the distill output"):
        stored = [
            bytes(d)
            for b in teacher.select_columns(["digest"]).iter_batches(batch_format="pyarrow", batch_size=None)
            for d in b.column("digest").to_pylist()
        ][:blocks]
        mine = [
            block_digest(row)
            for b in head.iter_batches(batch_format="numpy", batch_size=1024)
            for row in np.asarray(b["input_ids"])
        ]
    if stored != mine:
        first = next((i for i, (a, b) in enumerate(zip(stored, mine)) if a != b), min(len(stored), len(mine)))
        raise NexusError(
            f"the distill output {path} does not match the training data: block {first}'s tokens differ "
            "(another corpus, tokenizer or packing); rerun `nexus distill` on training's corpus"
        )
    return head.zip(teacher.limit(blocks)).materialize()


def summary_lines(out: Path, cfg: DistillConfig) -> list[str]:
    m = read_json(Path(out) / MANIFEST, "distill manifest")
    rate = m.get("steady_tokens_per_s") or m.get("tokens_per_s")
    return [
        f"scored {m['blocks']} blocks ({m['tokens']} tokens) with top-{m['top_k']} of {m['vocab_size']}, "
        f"{m['bytes_per_token']} bytes per token, {m['workers']} actor(s), {rate} tokens/s; wrote {out}"
    ]


def job_inputs(job) -> dict:
    """In the job: the model, the training corpus, and the block layout of the `train:` section."""
    from nexus.stages.train.config import TrainConfig

    t = job.section("train")
    steps = TrainConfig.model_construct(**t.model_dump(exclude={"enabled"})).total_steps
    return {
        "model": job.model_dir,
        "corpus": job.train_corpus,
        "seq_len": t.seq_len,
        "max_doc_tokens": t.max_doc_tokens,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "train_workers": t.workers,
        "steps": steps,
        "kd_temperature": t.kd_temperature,
    }
