"""Router statistics as sufficient statistics that add up exactly across shards.

Per MoE layer, over the tokens seen (padding excluded), in float64:

- ``n``: token count
- ``sum_p``: sum of the router probability vectors p (E)
- ``sum_ppt``: sum of p p^T (E x E), enough for the covariance and hence PCA
- ``topk_count``: how often each expert was among the selected top-k (E)
- ``topk_weight_sum``: summed routing weights each expert received when selected (E)
- ``entropy_sum``: summed entropy of p / sum(p) (nats)

Sums of float64 are associative enough that any split of the corpus gives the same result
to ~1e-12 relative; nothing here grows with the number of tokens.

Optionally a :class:`TokenReservoir` keeps raw probability rows of a bounded uniform sample
of tokens (for plots): each token has a hash key fixed by its position in the corpus, and the
reservoir holds the tokens with the smallest keys, so merging shards (union, keep the
smallest) gives exactly the reservoir of the whole corpus, whatever the split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from nexus.errors import NexusError
from nexus.util.artifacts import read_json, write_json

STATS_FILE = "router_stats.safetensors"
META_FILE = "router_stats.json"
_FIELDS = ("n", "sum_p", "sum_ppt", "topk_count", "topk_weight_sum", "entropy_sum")
_RESERVOIR_FIELDS = ("reservoir_keys", "reservoir_token_ids", "reservoir_probs")


@dataclass
class TokenReservoir:
    """Raw router probabilities of at most ``capacity`` tokens: the ones with the smallest keys.

    ``keys`` uint64 [R] ascending, ``token_ids`` int64 [R], ``probs`` float32 [L, R, E]; row r
    of every layer is the same token, so rows line up across layers.
    """

    capacity: int
    keys: np.ndarray
    token_ids: np.ndarray
    probs: np.ndarray

    @classmethod
    def empty(cls, capacity: int, num_layers: int, num_experts: int) -> TokenReservoir:
        return cls(
            int(capacity),
            np.zeros(0, dtype=np.uint64),
            np.zeros(0, dtype=np.int64),
            np.zeros((num_layers, 0, num_experts), dtype=np.float32),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def merge(self, other: TokenReservoir) -> TokenReservoir:
        """Union with ``other``, keeping the ``capacity`` smallest keys (in place; returns self)."""
        keys = np.concatenate([self.keys, other.keys])
        order = np.argsort(keys, kind="stable")[: self.capacity]
        self.keys = keys[order]
        self.token_ids = np.concatenate([self.token_ids, other.token_ids])[order]
        self.probs = np.ascontiguousarray(np.concatenate([self.probs, other.probs], axis=1)[:, order])
        return self

    @property
    def threshold(self) -> int | None:
        """Keys at or above this can no longer enter a full reservoir (None while not full)."""
        return int(self.keys[-1]) if len(self.keys) >= self.capacity and self.capacity > 0 else None


def stat_shapes(num_layers: int, num_experts: int) -> dict[str, tuple[int, ...]]:
    """Each sum's shape for ``num_layers`` MoE layers of ``num_experts`` experts."""
    L, E = num_layers, num_experts
    return {
        "n": (L,),
        "sum_p": (L, E),
        "sum_ppt": (L, E, E),
        "topk_count": (L, E),
        "topk_weight_sum": (L, E),
        "entropy_sum": (L,),
    }


def zero_sums(num_layers: int, num_experts: int, device=None) -> dict[str, torch.Tensor]:
    """Float64 zeros for every sum, on ``device`` (the collector keeps them on the model's device)."""
    return {
        name: torch.zeros(shape, dtype=torch.float64, device=device)
        for name, shape in stat_shapes(num_layers, num_experts).items()
    }


def accumulate(
    sums: Mapping[str, torch.Tensor],
    pos: int,
    probs: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """Add one router call's tokens to the sums of the layer at position ``pos``, in place.

    ``probs`` [T, E], ``weights`` / ``indices`` [T, k] (the routing weights and experts chosen),
    ``mask`` [T] float64 (1 for a token, 0 for padding), all on the sums' device. This is the
    one implementation of the statistics: the collector's router hooks call it on the device
    during collection, and :meth:`RouterStats.update` on its own arrays.
    """
    p = probs.to(torch.float64)
    mp = p * mask[:, None]
    sums["n"][pos] += mask.sum()
    sums["sum_p"][pos] += mp.sum(0)
    sums["sum_ppt"][pos] += mp.T @ p
    k = indices.shape[-1]
    idx = indices.reshape(-1).long()
    sums["topk_count"][pos].index_add_(0, idx, mask.repeat_interleave(k))
    sums["topk_weight_sum"][pos].index_add_(0, idx, (weights.to(torch.float64) * mask[:, None]).reshape(-1))
    q = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    ent = -(q * torch.log(q.clamp_min(1e-300))).sum(-1)
    sums["entropy_sum"][pos] += (ent * mask).sum()


def covariance_from_moments(n: float, sum_p: np.ndarray, sum_ppt: np.ndarray, ddof: int = 1) -> np.ndarray:
    """Covariance of the rows behind the moments n, sum p and sum p p^T (symmetrised)."""
    n = float(n)
    if n <= ddof:
        raise NexusError(f"{int(n)} tokens are too few for a covariance; collect more statistics")
    mu = np.asarray(sum_p, dtype=np.float64) / n
    cov = (np.asarray(sum_ppt, dtype=np.float64) - n * np.outer(mu, mu)) / (n - ddof)
    return (cov + cov.T) / 2


@dataclass
class RouterStats:
    """Sufficient statistics of router probabilities for every MoE layer."""

    layers: list[int]
    num_experts: int
    n: np.ndarray = field(default=None)  # [L]
    sum_p: np.ndarray = field(default=None)  # [L, E]
    sum_ppt: np.ndarray = field(default=None)  # [L, E, E]
    topk_count: np.ndarray = field(default=None)  # [L, E]
    topk_weight_sum: np.ndarray = field(default=None)  # [L, E]
    entropy_sum: np.ndarray = field(default=None)  # [L]
    meta: dict = field(default_factory=dict)
    reservoir: TokenReservoir | None = None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape for these layers and experts (readers check files against it)."""
        return stat_shapes(len(self.layers), self.num_experts)

    def __post_init__(self) -> None:
        for name, shape in self.expected_shapes().items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape, dtype=np.float64))

    # -- accumulation -------------------------------------------------------------------
    def update(
        self,
        pos: int,
        probs: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add tokens for the layer at position ``pos`` of ``self.layers`` (:func:`accumulate`).

        ``probs`` [T, E], ``indices``/``weights`` [T, k]; ``mask`` [T] marks real tokens
        (default: all rows are tokens).
        """
        probs = probs.detach().cpu()
        mask = (
            torch.ones(probs.shape[0], dtype=torch.float64) if mask is None else mask.cpu().to(torch.float64)
        )
        sums = {name: torch.from_numpy(getattr(self, name)) for name in _FIELDS}  # views: updated in place
        accumulate(sums, pos, probs, weights.detach().cpu(), indices.detach().cpu(), mask)

    def merge(self, other: RouterStats) -> RouterStats:
        """Add another shard's statistics into this one (in place) and return self."""
        if other.layers != self.layers or other.num_experts != self.num_experts:
            raise NexusError(
                "cannot merge router statistics of different models (layers or expert counts differ)"
            )
        for name in _FIELDS:
            getattr(self, name).__iadd__(getattr(other, name))
        if other.reservoir is not None:
            if self.reservoir is None:
                self.reservoir = TokenReservoir.empty(
                    other.reservoir.capacity, len(self.layers), self.num_experts
                )
            self.reservoir.merge(other.reservoir)
        return self

    @classmethod
    def sum(cls, parts: list[RouterStats]) -> RouterStats:
        if not parts:
            raise NexusError("no router statistics to merge")
        total = cls(list(parts[0].layers), parts[0].num_experts, meta=dict(parts[0].meta))
        for part in parts:
            total.merge(part)
        return total

    # -- derived quantities -------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return int(self.n[0]) if len(self.n) else 0

    def mean(self, pos: int) -> np.ndarray:
        return self.sum_p[pos] / max(self.n[pos], 1.0)

    def covariance(self, pos: int, ddof: int = 1) -> np.ndarray:
        """Covariance of p (``ddof=1`` like numpy/scikit-learn)."""
        try:
            return covariance_from_moments(self.n[pos], self.sum_p[pos], self.sum_ppt[pos], ddof)
        except NexusError as exc:
            raise NexusError(f"layer {self.layers[pos]}: {exc}") from None

    def frequency(self, pos: int) -> np.ndarray:
        """Share of tokens routed to each expert (ESFT-Token)."""
        return self.topk_count[pos] / max(self.n[pos], 1.0)

    def mean_gate(self, pos: int) -> np.ndarray:
        """Mean routing weight each expert receives per token (ESFT-Gate)."""
        return self.topk_weight_sum[pos] / max(self.n[pos], 1.0)

    def mean_entropy(self, pos: int) -> float:
        return float(self.entropy_sum[pos] / max(self.n[pos], 1.0))

    # -- I/O ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``router_stats.safetensors`` and ``router_stats.json`` into ``directory``."""
        d = Path(directory)
        tensors = {name: np.ascontiguousarray(getattr(self, name)) for name in _FIELDS}
        tensors["layers"] = np.asarray(self.layers, dtype=np.int64)
        meta = dict(self.meta)
        if self.reservoir is not None:
            r = self.reservoir
            tensors["reservoir_keys"] = np.ascontiguousarray(r.keys, dtype=np.uint64)
            tensors["reservoir_token_ids"] = np.ascontiguousarray(r.token_ids, dtype=np.int64)
            tensors["reservoir_probs"] = np.ascontiguousarray(r.probs, dtype=np.float32)
            meta["reservoir_capacity"] = r.capacity
            meta["reservoir_rows"] = len(r)
        save_file(tensors, str(d / STATS_FILE))
        meta.update({"layers": list(self.layers), "num_experts": self.num_experts, "tokens": self.tokens})
        write_json(d / META_FILE, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RouterStats:
        d = Path(directory)
        meta = read_json(d / META_FILE, "router statistics metadata")
        file = d / STATS_FILE
        if not file.is_file():
            raise NexusError(f"router statistics not found: {file}; run `nexus collect` first")
        try:
            t = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise NexusError(
                f"router statistics {file} are unreadable ({exc}); rerun `nexus collect`"
            ) from exc
        missing = [k for k in (*_FIELDS, "layers") if k not in t]
        if missing:
            raise NexusError(f"router statistics {file} lack {missing}; rerun `nexus collect`")
        layers = [int(x) for x in t["layers"]]
        reservoir = None
        if all(k in t for k in _RESERVOIR_FIELDS):
            reservoir = TokenReservoir(
                int(meta.get("reservoir_capacity", len(t["reservoir_keys"]))),
                t["reservoir_keys"].astype(np.uint64),
                t["reservoir_token_ids"].astype(np.int64),
                t["reservoir_probs"].astype(np.float32),
            )
        return cls(
            layers,
            int(t["sum_p"].shape[1]),
            **{k: t[k].astype(np.float64) for k in _FIELDS},
            meta=meta,
            reservoir=reservoir,
        )
