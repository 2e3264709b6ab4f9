"""Router-statistics collection: the ``collect`` stage.

The driver reads and tokenises the corpus with Ray Data (:mod:`nexus.data.corpus`), cuts documents
into sequences of at most ``seq_len`` tokens, takes them in corpus order until it has
``target_tokens`` tokens (cutting the last one), sorts them by length and groups them into
forward batches. Each batch is one row of a Ray Dataset, and a class-based ``map_batches``
UDF, :class:`RouterCollector`, runs them: one model per actor (``workers`` actors, each with
``gpus_per_worker`` GPUs or ``cpus_per_worker`` CPU threads), forward hooks on every router
that add each batch's tokens to float64 sums on the device (:func:`nexus.method.stats.accumulate`,
padding excluded), and per batch a partial :class:`~nexus.method.stats.RouterStats`
serialised with safetensors. The driver adds the partials up in batch order as they stream back.

Because the batches are fixed by the driver and added in a fixed order, every forward pass sees
exactly the same inputs however many actors or nodes run them, and the totals do not depend on
the split (bit for bit, given the same threads per actor). Only the decoder runs (no LM head):
routers are all we need.

The statistics do not grow with the number of tokens (L x E x E floats); an optional
reservoir keeps raw probability rows of a bounded uniform sample of tokens (see
:class:`~nexus.method.stats.TokenReservoir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from safetensors.numpy import load, save
from tqdm.auto import tqdm

from nexus import __version__
from nexus.config import CorpusFormat, ExpertsLayout, ModelDtype, RemoteCode, Seeded, input_, setting
from nexus.data.arrow import list_rows
from nexus.data.corpus import (
    corpus_record,
    read_corpus,
    resolve_corpus,
    skipped_documents,
    tokenize_corpus,
)
from nexus.errors import NexusError, user_errors
from nexus.method.stats import RouterStats, TokenReservoir, accumulate, zero_sums
from nexus.models import family_for_config, find_moe_blocks, routing, top_k_of
from nexus.models.identity import model_identity
from nexus.models.loading import load_config, load_model, resolve_experts
from nexus.util.artifacts import atomic_dir, claim_output, claims_released
from nexus.util.cluster import check_gpus, ensure_ray, gib
from nexus.util.preflight import check_seq_len, check_weights, max_positions

log = logging.getLogger(__name__)

#: the longest sequence collected when ``seq_len`` is not given (or the model's maximum, if smaller)
MAX_DEFAULT_SEQ_LEN = 1024
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# -- token keys for the reservoir ---------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def token_keys(seq_ids: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """A pseudo-random 64-bit key per token, fixed by (sequence index, position, seed)."""
    seq_ids = np.asarray(seq_ids, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    seq = np.repeat(seq_ids, lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = (np.arange(int(lengths.sum()), dtype=np.int64) - starts).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (seq << np.uint64(24)) ^ pos ^ _splitmix64(np.asarray([seed], dtype=np.uint64))[0]
    return _splitmix64(x)


# -- partial statistics on the wire (safetensors bytes, no pickles) -----------------------------
def stats_to_bytes(stats: RouterStats, metadata: dict | None = None) -> bytes:
    tensors = {
        "layers": np.asarray(stats.layers, dtype=np.int64),
        "n": stats.n,
        "sum_p": stats.sum_p,
        "sum_ppt": stats.sum_ppt,
        "topk_count": stats.topk_count,
        "topk_weight_sum": stats.topk_weight_sum,
        "entropy_sum": stats.entropy_sum,
    }
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if stats.reservoir is not None:
        r = stats.reservoir
        tensors["reservoir_keys"] = np.ascontiguousarray(r.keys, dtype=np.uint64)
        tensors["reservoir_token_ids"] = np.ascontiguousarray(r.token_ids, dtype=np.int64)
        tensors["reservoir_probs"] = np.ascontiguousarray(r.probs, dtype=np.float32)
        meta["reservoir_capacity"] = str(r.capacity)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    return save(tensors, metadata=meta)


def stats_from_bytes(data: bytes) -> tuple[RouterStats, dict]:
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    t = load(bytes(data))
    reservoir = None
    if "reservoir_keys" in t:
        reservoir = TokenReservoir(
            int(meta.get("reservoir_capacity", len(t["reservoir_keys"]))),
            t["reservoir_keys"],
            t["reservoir_token_ids"],
            t["reservoir_probs"],
        )
    stats = RouterStats(
        [int(x) for x in t["layers"]],
        int(t["sum_p"].shape[1]),
        n=t["n"],
        sum_p=t["sum_p"],
        sum_ppt=t["sum_ppt"],
        topk_count=t["topk_count"],
        topk_weight_sum=t["topk_weight_sum"],
        entropy_sum=t["entropy_sum"],
        reservoir=reservoir,
    )
    return stats, meta


# -- the collector ------------------------------------------------------------------------------
class RouterCollector:
    """Ray Data class UDF: loads the model once per actor and turns forward batches into partial
    router statistics.

    Each input row is one forward batch: ``ids`` (the sequences' tokens, concatenated),
    ``lengths`` and ``seq_ids`` (the sequences' positions in the collected stream, which fix
    the reservoir keys). Each call returns one row: ``partial`` (safetensors bytes of a
    :class:`RouterStats`) and ``tokens``.

    It can also be used directly, without Ray: ``RouterCollector(model_dir).collect_batch(seqs)``.
    """

    def __init__(
        self,
        model: str | os.PathLike | Any,
        *,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        experts: str = "auto",
        reservoir: int = 0,
        seed: int = 0,
        num_threads: int | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(max(1, min(int(num_threads), os.cpu_count() or 1)))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(model, (str, os.PathLike)):
            model = load_model(
                model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, experts=experts
            )
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.family = family_for_config(model.config)
        self.top_k = top_k_of(self.family, model.config)
        self.blocks = find_moe_blocks(model)
        self.layers = [b.layer for b in self.blocks]
        self.num_experts = self.blocks[0].num_experts
        self.decoder = model.base_model
        self.reservoir_capacity = int(reservoir)
        self.seed = int(seed)
        self._res_keys = np.zeros(0, dtype=np.uint64)  # this actor's smallest keys so far
        text = model.config.get_text_config()
        pad = pad_token_id if pad_token_id is not None else getattr(text, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        self.node = _node_id()
        self._sums: dict[str, torch.Tensor] | None = None
        self._mask = None
        self._res_rows = None
        self._res_probs: list | None = None
        self._handles = [
            b.router.register_forward_hook(self._hook(pos, b)) for pos, b in enumerate(self.blocks)
        ]

    # hooks --------------------------------------------------------------------------------
    def _hook(self, pos: int, block):
        def hook(module, inputs, output):
            if self._sums is None:
                return
            _, probs, weights, indices = routing(block, self.family, output, self.top_k)
            if probs.shape[0] != self._mask.shape[0]:
                raise RuntimeError(
                    f"router of layer {block.layer} saw {probs.shape[0]} rows, expected {self._mask.shape[0]}"
                )
            accumulate(self._sums, pos, probs, weights, indices, self._mask)
            if self._res_rows is not None:
                self._res_probs[pos] = probs.index_select(0, self._res_rows).float().cpu().numpy()

        return hook

    # one forward batch ----------------------------------------------------------------------
    def collect_batch(self, seqs: Sequence[np.ndarray], seq_ids: Sequence[int] | None = None) -> RouterStats:
        """Statistics of one forward batch of token sequences (right-padded, padding excluded)."""
        lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
        if len(seqs) == 0 or lengths.min() <= 0:
            raise ValueError("collect_batch needs non-empty sequences")
        b, width = len(seqs), int(lengths.max())
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        dev = self.device
        L, E = len(self.layers), self.num_experts
        self._sums = zero_sums(L, E, dev)
        mask_t = torch.from_numpy(mask).to(dev)
        self._mask = mask_t.reshape(-1).to(torch.float64)
        res_keys = res_flat = None
        if self.reservoir_capacity > 0:
            if seq_ids is None:
                raise ValueError("a reservoir needs seq_ids")
            keys = token_keys(np.asarray(seq_ids), lengths, self.seed)
            flat_pos = np.repeat(np.arange(b) * width, lengths) + np.concatenate(
                [np.arange(n) for n in lengths]
            )
            cap = self.reservoir_capacity
            thr = self._res_keys[-1] if len(self._res_keys) >= cap else None
            cand = np.flatnonzero(keys < thr) if thr is not None else np.arange(len(keys))
            cand = cand[np.argsort(keys[cand], kind="stable")[:cap]]
            res_keys, res_flat = keys[cand], flat_pos[cand]
            self._res_rows = torch.from_numpy(res_flat).to(dev)
            self._res_probs = [None] * L
        try:
            with torch.inference_mode():
                self.decoder(input_ids=torch.from_numpy(ids).to(dev), attention_mask=mask_t, use_cache=False)
            sums = {k: v.cpu().numpy() for k, v in self._sums.items()}
            res_probs = self._res_probs
        finally:
            self._sums = None
            self._mask = None
            self._res_rows = None
            self._res_probs = None
        stats = RouterStats(list(self.layers), E, **sums)
        if res_keys is not None:
            tok = ids.reshape(-1)[res_flat]
            probs = np.stack(res_probs) if L else np.zeros((0, len(res_keys), E), np.float32)
            # res_keys are ascending already (candidates were sorted by key)
            stats.reservoir = TokenReservoir(self.reservoir_capacity, res_keys, tok.astype(np.int64), probs)
            merged = np.sort(np.concatenate([self._res_keys, res_keys]))
            self._res_keys = merged[: self.reservoir_capacity]
        return stats

    # Ray Data entry point ------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        partials = []
        tokens = []
        for ids, lengths, seq_ids in zip(
            list_rows(batch, "ids"), list_rows(batch, "lengths"), list_rows(batch, "seq_ids")
        ):
            seqs = np.split(ids, np.cumsum(lengths)[:-1])
            stats = self.collect_batch(seqs, seq_ids)
            partials.append(stats_to_bytes(stats, {"node": self.node}))
            tokens.append(int(lengths.sum()))
        return pa.table({"partial": pa.array(partials, pa.binary()), "tokens": pa.array(tokens, pa.int64())})


def _node_id() -> str:
    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


# -- driver side ----------------------------------------------------------------------------------
def take_sequences(tds, target_tokens: int | None) -> tuple[list[np.ndarray], int]:
    """Sequences from a tokenised dataset, in corpus order, until ``target_tokens`` (cutting the last).

    Returns (sequences, tokens available if the corpus ran out, else -1).
    """
    tds.context.execution_options.preserve_order = True
    seqs: list[np.ndarray] = []
    total = 0
    with user_errors():
        for table in tds.iter_batches(batch_format="pyarrow", batch_size=None):
            for s in list_rows(table, "input_ids", np.int32):
                if len(s) == 0:
                    continue
                if target_tokens is not None and total + len(s) >= target_tokens:
                    seqs.append(s[: target_tokens - total].copy())
                    return seqs, -1
                seqs.append(s.copy())
                total += len(s)
    return seqs, total


def make_batches(seqs: Sequence[np.ndarray], batch_size: int) -> list:
    """Forward batches as one-row Arrow tables (longest sequences first, similar lengths together)."""
    lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
    order = np.lexsort((np.arange(len(seqs)), -lengths))
    tables = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lens = lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        flat = np.concatenate([seqs[i] for i in rows]).astype(np.int32)
        tables.append(
            pa.table(
                {
                    "ids": pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), pa.array(flat)),
                    "lengths": pa.ListArray.from_arrays(
                        pa.array([0, len(rows)], pa.int32()), pa.array(lens.astype(np.int32))
                    ),
                    "seq_ids": pa.ListArray.from_arrays(
                        pa.array([0, len(rows)], pa.int32()), pa.array(rows.astype(np.int64))
                    ),
                }
            )
        )
    return tables


def sequences_hash(seqs: Sequence[np.ndarray]) -> str:
    """SHA-256 of the collected token stream (order, lengths and ids)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(struct.pack("<q", len(s)))
        h.update(np.ascontiguousarray(s, dtype=np.int32).tobytes())
    return h.hexdigest()


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


# -- the stage ------------------------------------------------------------------------------------
class CollectConfig(ModelDtype, ExpertsLayout, CorpusFormat, Seeded, RemoteCode):
    """``nexus collect``: per-layer router statistics of a model on a corpus."""

    model: str = input_(help="base model directory (readable on every worker node)", identity="model")
    corpus: list[str] = input_(
        help="text/JSONL/Parquet files, directories, globs or URIs; a `nexus sample` output works as it is",
        identity="corpus",
    )
    output: str | None = input_(
        None, help="output directory (written atomically); none: only return (and print) the statistics"
    )
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    target_tokens: int | None = setting(
        200_000,
        help="tokens to collect (none: the whole corpus; if it has fewer, a warning and all of them)",
        gt=0,
    )
    workers: int = setting(1, help="collector actors, one model each (spread them over spare machines)", gt=0)
    gpus_per_worker: float = setting(0.0, help="GPUs per actor (0: CPU; fractions share a GPU)", ge=0)
    cpus_per_worker: float | None = setting(
        None,
        fingerprint=False,
        help="CPU threads per CPU actor (none: the cluster's CPUs split evenly; 1 with GPUs)",
        gt=0,
    )
    memory_gb: float | None = setting(
        None,
        fingerprint=False,
        help="memory Ray reserves per actor (GiB), so a node never holds more models than fit",
        gt=0,
    )
    batch_size: int = setting(8, help="sequences per forward pass", gt=0)
    seq_len: int | None = setting(
        None,
        help=f"longest sequence; longer documents are cut into pieces (none: the model's maximum, "
        f"at most {MAX_DEFAULT_SEQ_LEN})",
        gt=0,
    )
    reservoir: int = setting(
        0, help="also keep raw router probabilities of this many uniformly sampled tokens (for plots)", ge=0
    )
    progress: bool = setting(True, fingerprint=False, help="show a progress bar")


def resolve_seq_len(seq_len: int | None, config) -> int:
    """``seq_len``, or the model's maximum positions capped at :data:`MAX_DEFAULT_SEQ_LEN`."""
    return seq_len or min(max_positions(config) or MAX_DEFAULT_SEQ_LEN, MAX_DEFAULT_SEQ_LEN)


@claims_released()
def run(cfg: CollectConfig | None = None, /, **kwargs) -> RouterStats:
    """Collect router statistics of ``cfg.model`` on ``cfg.corpus``; write them to ``cfg.output``
    (``router_stats.safetensors`` + ``router_stats.json``, atomically) and return them."""
    cfg = CollectConfig.build(cfg, **kwargs)
    if cfg.output is not None:
        claim_output(cfg.output, cfg.overwrite)
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)  # non-MoE: one-line error here
    experts = resolve_experts(config, cfg.experts, model=cfg.model)
    seq_len = resolve_seq_len(cfg.seq_len, config)
    check_seq_len(config, seq_len)
    check_weights(cfg.model)  # damaged or missing files: here, not in every actor
    identity = model_identity(config)
    family = family_for_config(config)
    t0 = time.perf_counter()
    ensure_ray()
    workers, gpus = cfg.workers, cfg.gpus_per_worker
    check_gpus(workers * gpus, f"collection with {workers} worker(s)")
    cpus = cfg.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if gpus > 0 else max(1.0, math.floor(_cluster_cpus() / workers))
    if gpus == 0 and workers * cpus > _cluster_cpus():
        raise NexusError(
            f"{workers} worker(s) x {cpus:g} CPUs exceed the cluster's {_cluster_cpus():g} CPUs; "
            "use fewer --workers or add nodes"
        )

    files = resolve_corpus(cfg.corpus, cfg.corpus_format)
    skipped = skipped_documents(cfg.skip_bad_documents)
    ds = read_corpus(
        cfg.corpus, cfg.text_field, file_format=cfg.corpus_format, text_unit=cfg.text_unit, skipped=skipped
    )
    tds = tokenize_corpus(
        ds, cfg.model, max_doc_tokens=seq_len, split_long=True, trust_remote_code=cfg.trust_remote_code
    )
    seqs, available = take_sequences(tds, cfg.target_tokens)
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    if not seqs:
        raise NexusError("the corpus has no text to collect statistics on; check --corpus and --text-field")
    tokens = int(sum(len(s) for s in seqs))
    if available >= 0 and cfg.target_tokens is not None:
        log.warning(
            "the corpus has only %d tokens, fewer than the %d asked for; collecting all of them",
            available,
            cfg.target_tokens,
        )
    batches = make_batches(seqs, cfg.batch_size)
    corpus_hash = sequences_hash(seqs)
    del seqs
    log.info(
        "collecting router statistics: %d tokens in %d batches, %d worker(s)", tokens, len(batches), workers
    )

    bds = ray.data.from_arrow(batches)
    # partials come back in batch order, so the float64 totals are the same whatever the split
    bds.context.execution_options.preserve_order = True
    out = bds.map_batches(
        RouterCollector,
        fn_constructor_kwargs={
            "model": cfg.model,
            "dtype": cfg.dtype,
            "device": "cuda" if gpus > 0 else "cpu",
            "trust_remote_code": cfg.trust_remote_code,
            "experts": experts,
            "reservoir": cfg.reservoir,
            "seed": cfg.seed,
            "num_threads": None if gpus > 0 else int(cpus),
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus or None,
        num_cpus=cpus,
        **({"memory": gib(cfg.memory_gb)} if cfg.memory_gb else {}),
    )
    total: RouterStats | None = None
    nodes: set[str] = set()
    bar = tqdm(
        total=tokens, unit="tok", unit_scale=True, desc="collect", disable=not cfg.progress, mininterval=2
    )
    t_first = t_last = None
    first_tokens = 0
    with user_errors("collecting router statistics"), bar:
        for row in out.iter_rows():
            part, meta = stats_from_bytes(row["partial"])
            t_last = time.perf_counter()
            if t_first is None:
                t_first, first_tokens = t_last, int(row["tokens"])
            nodes.add(meta.get("node", "?"))
            total = part if total is None else total.merge(part)
            bar.update(int(row["tokens"]))
    if total is None:
        raise NexusError("collection produced no statistics")
    elapsed = time.perf_counter() - t0
    if total.layers != identity["moe_layers"] or total.num_experts != identity["num_experts"]:
        raise NexusError("the collectors saw different MoE layers than the model config describes")
    total.meta = {
        "kind": "nexus-router-stats",
        "nexus_version": __version__,
        "identity": identity,
        "model": cfg.model,
        "family": family.name,
        "probabilities": family.probs,
        "top_k": top_k_of(family, config),
        "sequences": int(sum(len(t.column("lengths")[0]) for t in batches)),
        "target_tokens": cfg.target_tokens,
        "seq_len": int(seq_len),
        "batch_size": cfg.batch_size,
        "dtype": cfg.dtype,
        "experts": experts,
        "workers": workers,
        "gpus_per_worker": float(gpus),
        "cpus_per_worker": float(cpus),
        "nodes": sorted(nodes),
        "corpus": corpus_record(cfg.corpus, files, cfg.text_field, cfg.text_unit),
        "corpus_hash": corpus_hash,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        # after the first batch came back (actors started, model loaded): the collection rate itself
        "steady_tokens_per_s": (
            round((tokens - first_tokens) / (t_last - t_first), 1) if t_last and t_last > t_first else None
        ),
    }
    if skip_record is not None:
        total.meta["skipped_documents"] = skip_record
    if int(total.n[0]) != tokens:
        raise NexusError(f"collected {int(total.n[0])} tokens but sent {tokens}; a worker lost data")
    log.info(
        "collected %d tokens from %d MoE layers x %d experts in %.1fs (%.0f tokens/s, %d node(s))",
        tokens,
        len(total.layers),
        total.num_experts,
        elapsed,
        tokens / max(elapsed, 1e-9),
        len(nodes),
    )
    if cfg.output is not None:
        with atomic_dir(cfg.output, cfg.overwrite) as tmp:
            total.save(tmp)
        log.info("wrote %s", Path(cfg.output))
    return total


def summary_lines(stats: RouterStats, cfg: CollectConfig) -> list[str]:
    """Tokens, speed, and per layer the routing entropy and the busiest expert."""
    m = stats.meta
    where = f"; wrote {cfg.output}" if cfg.output else ""
    lines = [
        f"collected {stats.tokens} tokens, {len(stats.layers)} MoE layers x {stats.num_experts} experts "
        f"(top-{m['top_k']}) in {m['elapsed_s']:.1f}s ({m['tokens_per_s']:.0f} tokens/s){where}"
    ]
    for pos, layer in enumerate(stats.layers):
        freq = stats.frequency(pos)
        lines.append(
            f"  layer {layer:>3}: entropy {stats.mean_entropy(pos):.3f} nats, busiest expert "
            f"{int(freq.argmax())} ({100 * freq.max() / max(freq.sum(), 1e-12):.1f}% of selections)"
        )
    return lines


def job_inputs(job) -> dict:
    """In the job: the sample stage's output (its ``text`` column), or the training corpus when
    sampling is off."""
    if job.enabled("sample"):
        return {
            "model": job.model_dir,
            "corpus": [job.stage_dir("sample")],
            "text_field": "text",
            "corpus_format": "auto",
        }
    return {"model": job.model_dir, "corpus": job.train_corpus}
