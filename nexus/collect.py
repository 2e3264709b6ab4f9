"""Router-statistics collection: the ``collect`` stage.

The driver reads and tokenises the corpus with Ray Data (:mod:`nexus.corpus`), cuts documents
into sequences of at most ``seq_len`` tokens, takes them in corpus order until it has
``target_tokens`` tokens (cutting the last one), sorts them by length and groups them into
forward batches. Each batch is one row of a Ray Dataset, and a class-based ``map_batches``
UDF, :class:`RouterCollector`, runs them: one model per actor (``workers`` actors, each with
``gpus_per_worker`` GPUs or ``cpus_per_worker`` CPU threads), forward hooks on every router,
and per batch a partial :class:`~nexus.stats.RouterStats` (float64 sums, padding excluded)
serialised with safetensors. The driver adds the partials up as they stream back.

Because the batches are fixed by the driver, every forward pass sees exactly the same
inputs however many actors or nodes run them, and the float64 sums agree to ~1e-15
relative across any split. Only the decoder runs (no LM head): routers are all we need.

The statistics do not grow with the number of tokens (L x E x E floats); an optional
reservoir keeps raw probability rows of a bounded uniform sample of tokens (see
:class:`~nexus.stats.TokenReservoir`).
"""

from __future__ import annotations

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

from nexus.artifacts import claims_released
from nexus.errors import NexusError
from nexus.stats import RouterStats, TokenReservoir

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 1024
DEFAULT_BATCH_SIZE = 8
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
    from safetensors.numpy import save

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
    from safetensors.numpy import load

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
        fault: dict | None = None,
    ) -> None:
        import torch

        from nexus.families import family_for_config, find_moe_blocks, top_k_of

        if num_threads:
            torch.set_num_threads(max(1, min(int(num_threads), os.cpu_count() or 1)))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(model, (str, os.PathLike)):
            from nexus.loading import load_model

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
        self.fault = fault
        self._acc: dict[str, Any] | None = None
        self._mask = None
        self._res_rows = None
        self._res_probs: list | None = None
        self._handles = [
            b.router.register_forward_hook(self._hook(pos, b)) for pos, b in enumerate(self.blocks)
        ]

    # hooks --------------------------------------------------------------------------------
    def _hook(self, pos: int, block):
        import torch

        from nexus.families import routing

        def hook(module, inputs, output):
            acc = self._acc
            if acc is None:
                return
            _, probs, weights, indices = routing(block, self.family, output, self.top_k)
            m = self._mask
            if probs.shape[0] != m.shape[0]:
                raise RuntimeError(
                    f"router of layer {block.layer} saw {probs.shape[0]} rows, expected {m.shape[0]}"
                )
            p = probs.to(torch.float64)
            mp = p * m[:, None]
            acc["n"][pos] += m.sum()
            acc["sum_p"][pos] += mp.sum(0)
            acc["sum_ppt"][pos] += mp.T @ p
            k = indices.shape[-1]
            idx = indices.reshape(-1).long()
            acc["topk_count"][pos].index_add_(0, idx, m.repeat_interleave(k))
            acc["topk_weight_sum"][pos].index_add_(
                0, idx, (weights.to(torch.float64) * m[:, None]).reshape(-1)
            )
            q = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
            ent = -(q * torch.log(q.clamp_min(1e-300))).sum(-1)
            acc["entropy_sum"][pos] += (ent * m).sum()
            if self._res_rows is not None:
                self._res_probs[pos] = probs.index_select(0, self._res_rows).float().cpu().numpy()

        return hook

    # one forward batch ----------------------------------------------------------------------
    def collect_batch(self, seqs: Sequence[np.ndarray], seq_ids: Sequence[int] | None = None) -> RouterStats:
        """Statistics of one forward batch of token sequences (right-padded, padding excluded)."""
        import torch

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
        self._acc = {
            "n": torch.zeros(L, dtype=torch.float64, device=dev),
            "sum_p": torch.zeros(L, E, dtype=torch.float64, device=dev),
            "sum_ppt": torch.zeros(L, E, E, dtype=torch.float64, device=dev),
            "topk_count": torch.zeros(L, E, dtype=torch.float64, device=dev),
            "topk_weight_sum": torch.zeros(L, E, dtype=torch.float64, device=dev),
            "entropy_sum": torch.zeros(L, dtype=torch.float64, device=dev),
        }
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
            acc = {k: v.cpu().numpy() for k, v in self._acc.items()}
            res_probs = self._res_probs
        finally:
            self._acc = None
            self._mask = None
            self._res_rows = None
            self._res_probs = None
        stats = RouterStats(list(self.layers), E, **acc)
        if res_keys is not None:
            tok = ids.reshape(-1)[res_flat]
            probs = np.stack(res_probs) if L else np.zeros((0, len(res_keys), E), np.float32)
            # res_keys are ascending already (candidates were sorted by key)
            stats.reservoir = TokenReservoir(self.reservoir_capacity, res_keys, tok.astype(np.int64), probs)
            merged = np.sort(np.concatenate([self._res_keys, res_keys]))
            self._res_keys = merged[: self.reservoir_capacity]
        return stats

    # Ray Data entry point ------------------------------------------------------------------------
    def __call__(self, batch):
        import pyarrow as pa

        partials = []
        tokens = []
        for ids, lengths, seq_ids in zip(
            batch.column("ids").to_numpy(zero_copy_only=False),
            batch.column("lengths").to_numpy(zero_copy_only=False),
            batch.column("seq_ids").to_numpy(zero_copy_only=False),
        ):
            if self.fault:
                _busy_signal(self.fault, self.node)
            lengths = np.asarray(lengths, dtype=np.int64)
            ids = np.asarray(ids, dtype=np.int64)
            seqs = np.split(ids, np.cumsum(lengths)[:-1])
            stats = self.collect_batch(seqs, np.asarray(seq_ids, dtype=np.int64))
            partials.append(stats_to_bytes(stats, {"node": self.node}))
            tokens.append(int(lengths.sum()))
        return pa.table({"partial": pa.array(partials, pa.binary()), "tokens": pa.array(tokens, pa.int64())})


def _busy_signal(fault: dict, node: str) -> None:
    """Test hook: note that this node is working on a batch (a file in ``marker_dir`` named
    after the node), then take ``delay_s`` longer, so a test can remove the node mid-batch."""
    marker_dir = fault.get("marker_dir")
    if marker_dir:
        Path(marker_dir, f"{node}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(float(fault.get("delay_s", 0.0)))


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray
        pass
    return socket.gethostname()


# -- driver side ----------------------------------------------------------------------------------
def take_sequences(tds, target_tokens: int | None) -> tuple[list[np.ndarray], int]:
    """Sequences from a tokenised dataset, in corpus order, until ``target_tokens`` (cutting the last).

    Returns (sequences, tokens available if the corpus ran out, else -1).
    """
    import pyarrow as pa

    from nexus.corpus import user_errors

    tds.context.execution_options.preserve_order = True
    seqs: list[np.ndarray] = []
    total = 0
    with user_errors():
        for table in tds.iter_batches(batch_format="pyarrow", batch_size=None):
            if table.num_rows == 0:
                continue
            col = table.column("input_ids")
            arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            offsets = np.asarray(arr.offsets, dtype=np.int64)
            flat = np.asarray(arr.values, dtype=np.int32)
            for a, b in zip(offsets[:-1], offsets[1:]):
                if b <= a:
                    continue
                s = flat[a:b]
                if target_tokens is not None and total + len(s) >= target_tokens:
                    seqs.append(s[: target_tokens - total].copy())
                    return seqs, -1
                seqs.append(s.copy())
                total += len(s)
    return seqs, total


def make_batches(seqs: Sequence[np.ndarray], batch_size: int) -> list:
    """Forward batches as one-row Arrow tables (longest sequences first, similar lengths together)."""
    import pyarrow as pa

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
    import hashlib

    h = hashlib.sha256()
    for s in seqs:
        h.update(struct.pack("<q", len(s)))
        h.update(np.ascontiguousarray(s, dtype=np.int32).tobytes())
    return h.hexdigest()


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


@claims_released()
def collect(
    model: str | os.PathLike,
    corpus: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike | None,
    target_tokens: int | None = None,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int = DEFAULT_SEQ_LEN,
    dtype: str = "float32",
    experts: str = "auto",
    text_field: str = "text",
    file_format: str = "auto",
    text_unit: str = "line",
    reservoir: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    ray_remote_args: dict | None = None,
    fault: dict | None = None,
    skip_bad_documents: bool = False,
) -> RouterStats:
    """Collect router statistics of ``model`` on ``corpus`` and write them to ``output``.

    Args:
        model: base model directory (it must be readable on every node that runs a worker).
        corpus: files, directories, globs or URIs (see :func:`nexus.corpus.read_corpus`); a
            ``nexus sample`` output directory works as it is.
        output: directory for ``router_stats.safetensors`` and ``router_stats.json`` (written
            atomically); ``None`` to only return the statistics.
        target_tokens: tokens to collect (``None``: the whole corpus). If the corpus has
            fewer, a warning is logged and all of them are used.
        workers: collector actors (one model each). ``gpus_per_worker`` GPUs each (fractions
            share a GPU), or on CPU ``cpus_per_worker`` threads each (default: the cluster's
            CPUs split evenly).
        batch_size, seq_len: sequences per forward pass and the longest sequence; longer
            documents are cut into consecutive pieces.
        experts: how the actors hold the routed experts: ``auto`` (packed for MXFP4
            checkpoints), ``packed`` or ``dequantized`` (see :func:`nexus.loading.load_model`).
        reservoir: keep raw probability rows of this many uniformly sampled tokens (0: none).
        ray_remote_args: extra Ray options for the actors (e.g. a scheduling strategy).
        fault: test hook, ``{"delay_s": seconds, "marker_dir": dir}``: every collector takes
            ``delay_s`` longer per batch and leaves a file named after its node in
            ``marker_dir``, so a test can remove a node while it is busy.
        skip_bad_documents: skip damaged documents of the corpus (counted in the
            statistics' metadata, ``skipped_documents``) instead of stopping at the first.
    """
    import ray

    from nexus import __version__
    from nexus.artifacts import atomic_dir, claim_output
    from nexus.corpus import (
        corpus_record,
        read_corpus,
        resolve_corpus,
        skipped_documents,
        tokenize_corpus,
        user_errors,
    )
    from nexus.families import family_for_config, top_k_of
    from nexus.identity import model_identity
    from nexus.loading import load_config, parse_dtype, resolve_experts
    from nexus.preflight import check_seq_len, check_weights
    from nexus.ray_utils import check_gpus, ensure_ray

    for name, value in (("workers", workers), ("batch_size", batch_size), ("seq_len", seq_len)):
        if int(value) <= 0:
            raise NexusError(f"{name} must be positive, got {value}")
    if target_tokens is not None and int(target_tokens) <= 0:
        raise NexusError(f"target tokens must be positive, got {target_tokens}")
    if gpus_per_worker < 0:
        raise NexusError(f"gpus per worker must be zero or more, got {gpus_per_worker}")
    if reservoir < 0:
        raise NexusError(f"reservoir size must be zero or more, got {reservoir}")
    parse_dtype(dtype)
    if output is not None:
        claim_output(output, overwrite)
    config = load_config(model, trust_remote_code=trust_remote_code)  # non-MoE: one-line error here
    experts = resolve_experts(config, experts, model=model)
    check_seq_len(config, seq_len)
    check_weights(model)  # damaged or missing files: here, not in every actor
    identity = model_identity(config)
    family = family_for_config(config)
    t0 = time.perf_counter()
    ensure_ray()
    check_gpus(workers * gpus_per_worker, f"collection with {workers} worker(s)")
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if gpus_per_worker > 0 else max(1.0, math.floor(_cluster_cpus() / workers))
    if gpus_per_worker == 0 and workers * cpus_per_worker > _cluster_cpus():
        raise NexusError(
            f"{workers} worker(s) x {cpus_per_worker:g} CPUs exceed the cluster's {_cluster_cpus():g} CPUs; "
            "use fewer --workers or add nodes"
        )

    files = resolve_corpus(corpus, file_format)
    skipped = skipped_documents(skip_bad_documents)
    ds = read_corpus(corpus, text_field, file_format=file_format, text_unit=text_unit, skipped=skipped)
    tds = tokenize_corpus(
        ds, os.fspath(model), max_doc_tokens=seq_len, split_long=True, trust_remote_code=trust_remote_code
    )
    seqs, available = take_sequences(tds, target_tokens)
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    if not seqs:
        raise NexusError("the corpus has no text to collect statistics on; check --corpus and --text-field")
    tokens = int(sum(len(s) for s in seqs))
    if available >= 0 and target_tokens is not None:
        log.warning(
            "the corpus has only %d tokens, fewer than the %d asked for; collecting all of them",
            available,
            target_tokens,
        )
    batches = make_batches(seqs, batch_size)
    corpus_hash = sequences_hash(seqs)
    del seqs
    log.info(
        "collecting router statistics: %d tokens in %d batches, %d worker(s)", tokens, len(batches), workers
    )

    bds = ray.data.from_arrow(batches)
    remote = dict(ray_remote_args or {})
    out = bds.map_batches(
        RouterCollector,
        fn_constructor_kwargs={
            "model": os.fspath(model),
            "dtype": dtype,
            "device": "cuda" if gpus_per_worker > 0 else "cpu",
            "trust_remote_code": trust_remote_code,
            "experts": experts,
            "reservoir": reservoir,
            "seed": seed,
            "num_threads": None if gpus_per_worker > 0 else int(cpus_per_worker),
            "fault": fault,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker or None,
        num_cpus=cpus_per_worker,
        **remote,
    )
    total: RouterStats | None = None
    nodes: set[str] = set()
    from tqdm.auto import tqdm

    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="collect", disable=not progress, mininterval=2)
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
        "model": os.fspath(model),
        "family": family.name,
        "probabilities": family.probs,
        "top_k": top_k_of(family, config),
        "sequences": int(sum(len(t.column("lengths")[0]) for t in batches)),
        "target_tokens": None if target_tokens is None else int(target_tokens),
        "seq_len": int(seq_len),
        "batch_size": int(batch_size),
        "dtype": str(dtype),
        "experts": experts,
        "workers": int(workers),
        "gpus_per_worker": float(gpus_per_worker),
        "cpus_per_worker": float(cpus_per_worker),
        "nodes": sorted(nodes),
        "corpus": corpus_record(corpus, files, text_field, text_unit),
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
    if output is not None:
        with atomic_dir(output, overwrite) as tmp:
            total.save(tmp)
        log.info("wrote %s", Path(output))
    return total
