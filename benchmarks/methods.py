"""The specialisation methods the benchmarks compare, and the one training loop they share.

Used by ``benchmarks/quality.py`` (perplexity) and ``benchmarks/train.py`` (throughput), so
both measure exactly the same thing. Every method trains with the loss code of ``nexus
train`` (:func:`nexus.stages.train.core.compute_losses`: chunked cross-entropy, plus KD from the
same model with the shared experts switched off for NEXUS) and the same optimiser and
schedule as :mod:`nexus.stages.train.loop` (AdamW, betas 0.9/0.95, linear warmup then cosine to a
minimum ratio, gradient clipping); they differ only in which parameters are trainable:

- ``base``: nothing (the untrained base model).
- ``nexus``: one shared expert per MoE layer (``pca``/``frequency``/``gate`` inits are made by
  the real pipeline stages ``sample -> collect -> analyze -> convert``; ``zero``/``random``
  by ``nexus train``'s own attach path), optionally the routers too, or PEFT LoRA on the
  attention projections next to it (``attn_rank``).
- ``lora``: PEFT LoRA on the attention projections (q, k, v, o) and on the fused expert
  tensors through ``target_parameters`` (``mlp.experts.gate_up_proj``/``down_proj``), or on
  either alone (``lora_on``).
- ``esft``: ESFT (Wang et al. 2024): only the routed experts selected per layer by
  ESFT-Token (share of tokens routed to the expert) or ESFT-Gate (mean routing weight),
  from the same router statistics NEXUS uses. GPT-OSS fuses all experts of a layer into
  one tensor, so the gradient of the unselected experts' slices is masked to zero; with
  AdamW and no weight decay those slices then never move (checked after training).
- ``full``: every parameter.

Distillation (``kd_weight``, NEXUS's :data:`KD_WEIGHT` and the config's temperature) needs a
teacher "with the adapter switched off" that costs no second copy of the model: NEXUS switches
its shared experts off; ``lora-r<R>-kd`` uses PEFT's ``disable_adapter()``; ``esft-token-kd`` /
``esft-gate-kd`` keep a frozen copy of only the experts they train and swap those original
weights in for the teacher forward (:func:`original_experts`). Full fine-tuning would need a
second model, so it trains on cross-entropy only; ``nexus-kd0`` is NEXUS on that footing.
``nexus-offline-k<K>`` is the default NEXUS with offline KD (``kd: offline``): the teacher's
top-K rows of every training block are computed once by ``nexus distill``'s scorer
(:class:`TeacherTable`) and the steps run no teacher forward.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus.stages.train.config import TrainConfig  # noqa: E402

KINDS = ("base", "nexus", "lora", "esft", "full")
#: LoRA's targets, as PEFT's (target_modules, target_parameters): the attention projections
#: and GPT-OSS's fused expert tensors
_ATTN, _EXPERTS = (
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)
LORA_TARGETS = {"attn+experts": (_ATTN, _EXPERTS), "attn": (_ATTN, None), "experts": (None, _EXPERTS)}


@dataclass(frozen=True)
class Method:
    """One specialisation method and its hyper-parameters (lr: the peak learning rate)."""

    name: str
    kind: str
    label: str = ""
    lr: float = 1e-3
    # nexus
    init: str = "pca"
    gate: str = "scalar"
    top_k: int | None = 4
    train_router: bool = False
    kd_weight: float = 0.0
    #: nexus: ``online`` (a teacher forward per step) or ``offline`` (stored top-``teacher_k`` rows)
    kd: str = "online"
    teacher_k: int = 0
    #: the shared expert's width, as a multiple of a routed expert's (convert's fit_width)
    width: float = 1.0
    #: nexus: also train each layer's top-``unfreeze`` routed experts by ``esft_score`` (ESFT's way)
    unfreeze: int = 0
    #: nexus: also PEFT LoRA of this rank on the attention projections (teacher: both adapters off)
    attn_rank: int = 0
    #: the distillation temperature T (every distilled method; ``nexus train``'s ``kd_temperature``)
    temperature: float = 1.0
    # lora
    rank: int = 0
    #: what LoRA adapts: ``attn+experts`` (both), ``attn`` (q/k/v/o only) or ``experts`` (the fused expert tensors only)
    lora_on: str = "attn+experts"
    # esft
    esft_score: str = "frequency"
    esft_k: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}")
        if self.kind in ("base", "full") and self.kd_weight:
            raise ValueError(f"{self.kind!r} has no teacher without a second copy of the model (kd_weight)")
        if self.unfreeze and self.kind != "nexus":
            raise ValueError("unfreeze adds ESFT's experts to NEXUS (esft: esft_k)")
        if self.width != 1 and (self.kind != "nexus" or self.init in ("zero", "random")):
            raise ValueError("width applies to NEXUS's averaged inits (convert's fit_width)")
        if self.attn_rank and (self.kind != "nexus" or self.unfreeze or self.kd == "offline"):
            raise ValueError("attn_rank adds attention LoRA to NEXUS with online KD (not with unfreeze)")
        if self.lora_on not in LORA_TARGETS:
            raise ValueError(f"lora_on: one of {', '.join(LORA_TARGETS)}")
        if self.kd == "offline" and not (self.kd_weight and self.teacher_k > 0):
            raise ValueError("offline KD needs kd_weight > 0 and teacher_k > 0")

    @property
    def trains(self) -> bool:
        return self.kind != "base"

    def with_(self, **kw) -> Method:
        return replace(self, **kw)


#: peak learning rates chosen by the sweep in docs/benchmarks.md (``quality.py --sweep-lr``, seed 0):
#: per method, the value with the lowest mean of held-out domain and general NLL
#: (``quality.score``), i.e. specialisation and retention weighted equally. For NEXUS 3e-3
#: and 1e-3 (the pipeline's default) tied; the NEXUS variants are compared at 3e-3.
NEXUS_LR = 3e-3
LORA_LR = 3e-4
ESFT_LR = 3e-3
FULL_LR = 3e-4
#: NEXUS's KD weight; every distilled baseline uses the same (and the same temperature)
KD_WEIGHT = 0.5

# fmt: off
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("base", "base", "base model (no training)"),
        Method("nexus", "nexus", f"NEXUS pca init, scalar gate, KD {KD_WEIGHT:g}", NEXUS_LR, kd_weight=KD_WEIGHT),
        Method("nexus-frequency", "nexus", "NEXUS frequency init", NEXUS_LR, init="frequency", kd_weight=KD_WEIGHT),
        Method("nexus-zero", "nexus", "NEXUS zero init", NEXUS_LR, init="zero", top_k=None, kd_weight=KD_WEIGHT),
        Method("nexus-random", "nexus", "NEXUS random init", NEXUS_LR, init="random", top_k=None,
               kd_weight=KD_WEIGHT),
        Method("nexus-sigmoid", "nexus", "NEXUS sigmoid gate", NEXUS_LR, gate="sigmoid", kd_weight=KD_WEIGHT),
        Method("nexus-router", "nexus", "NEXUS + trainable router", NEXUS_LR, train_router=True,
               kd_weight=KD_WEIGHT),
        Method("nexus-kd0", "nexus", "NEXUS without KD", NEXUS_LR, kd_weight=0.0),
        Method("lora-r11", "lora", "LoRA r11 attn+experts (~NEXUS params)", LORA_LR, rank=11),
        Method("lora-r2", "lora", "LoRA r2 attn+experts", LORA_LR, rank=2),
        Method("esft-token", "esft", "ESFT-Token (top-1 expert/layer)", ESFT_LR, esft_score="frequency"),
        Method("esft-gate", "esft", "ESFT-Gate (top-1 expert/layer)", ESFT_LR, esft_score="gate"),
        Method("esft-token-kd", "esft", "ESFT-Token, KD from its experts' original weights", ESFT_LR,
               esft_score="frequency", kd_weight=KD_WEIGHT),
        Method("esft-gate-kd", "esft", "ESFT-Gate, KD from its experts' original weights", ESFT_LR,
               esft_score="gate", kd_weight=KD_WEIGHT),
        Method("full-ft", "full", "full fine-tuning", FULL_LR),
    ]
}
# fmt: on


#: ``nexus-kd<W>[-w<F>][-esft<K>][-sigmoid][-router][-attn<R>][-t<T>]``
_NEXUS_KD = r"nexus-kd(\d+(?:\.\d+)?)(?:-w(\d+(?:\.\d+)?))?(?:-esft(\d+))?(-sigmoid)?(-router)?(?:-attn(\d+))?(?:-t(\d+(?:\.\d+)?))?"


def get_method(name: str) -> Method:
    """A method by name; ``NAME@LR`` is the same method at another learning rate."""
    if "@" in name:
        base, lr = name.split("@", 1)
        return _named_method(base).with_(lr=float(lr))
    return _named_method(name)


def _named_method(name: str) -> Method:
    """A registered method, or a variant: ``nexus-topk<K>``, ``nexus-kd<W>[-w<F>][-esft<K>][-sigmoid][-router][-attn<R>][-t<T>]``,
    ``nexus-offline-k<K>`` (the default NEXUS with top-k K, KD weight W [and a shared expert F
    times an expert's width] [and ESFT-Gate's top-K routed experts trained too] [with the
    sigmoid gate] [with trainable routers] [and LoRA of rank R on attention] [at distillation
    temperature T], or offline KD
    from the teacher's top-K),
    ``lora-r<R>``, ``lora[-attn|-experts]-r<R>-kd[<W>][-t<T>]`` (LoRA of rank R [on attention or the experts only], distilled from its base at KD weight
    W, default :data:`KD_WEIGHT`, temperature T), ``esft-token-kd<W>``, ``esft-gate-kd<W>`` (ESFT at KD weight W)."""
    if name in METHODS:
        return METHODS[name]
    m = re.fullmatch(r"nexus-topk(\d+)", name)
    if m:
        k = int(m.group(1))
        return METHODS["nexus"].with_(name=name, label=f"NEXUS pca init, top-{k}", top_k=k)
    m = re.fullmatch(_NEXUS_KD, name)
    if m:
        w, width, k = float(m.group(1)), float(m.group(2) or 1), int(m.group(3) or 0)
        t, attn = float(m.group(7) or 1), int(m.group(6) or 0)
        label = f"NEXUS, KD weight {w:g}" + (f" at T {t:g}" if t != 1 else "")
        label += f", {width:g}x expert width" if width != 1 else ""
        label += f", + ESFT-Gate top-{k} expert(s)" if k else ""
        label += ", sigmoid gate" if m.group(4) else ""
        label += ", + trainable router" if m.group(5) else ""
        label += f", + LoRA r{attn} on attention" if attn else ""
        esft = {"unfreeze": k, "esft_score": "gate"} if k else {}  # (no other field moves the run key)
        gate = "sigmoid" if m.group(4) else "scalar"
        return METHODS["nexus"].with_(
            name=name,
            label=label,
            kd_weight=w,
            width=width,
            gate=gate,
            train_router=bool(m.group(5)),
            temperature=t,
            attn_rank=attn,
            **esft,
        )
    m = re.fullmatch(r"nexus-offline-k(\d+)", name)
    if m:
        k = int(m.group(1))
        return METHODS["nexus"].with_(
            name=name, label=f"NEXUS, offline KD top-{k}", kd="offline", teacher_k=k
        )
    m = re.fullmatch(r"lora(?:-(attn|experts))?-r(\d+)-kd(\d+(?:\.\d+)?)?(?:-t(\d+(?:\.\d+)?))?", name)
    if m:  # distilled from its own base: PEFT's disable_adapter() is the teacher
        on, r, w, t = (
            m.group(1) or "attn+experts",
            int(m.group(2)),
            float(m.group(3) or KD_WEIGHT),
            float(m.group(4) or 1),
        )
        label = f"LoRA r{r} {on}, KD {w:g}" + (f" at T {t:g}" if t != 1 else "")
        return METHODS["lora-r2"].with_(
            name=name, label=label, rank=r, kd_weight=w, temperature=t, lora_on=on
        )
    m = re.fullmatch(r"(esft-(?:token|gate))-kd(\d+(?:\.\d+)?)", name)
    if m:  # ESFT distilled from its experts' original weights at KD weight W
        w, base = float(m.group(2)), METHODS[f"{m.group(1)}-kd"]
        head, tail = base.label.split(", KD ", 1)
        return base.with_(name=name, label=f"{head}, KD {w:g} {tail}", kd_weight=w)
    m = re.fullmatch(r"lora-r(\d+)", name)
    if m:
        r = int(m.group(1))
        return METHODS["lora-r2"].with_(name=name, label=f"LoRA r{r} attn+experts", rank=r)
    raise SystemExit(
        f"unknown method '{name}'; choose from {', '.join(METHODS)}, nexus-topk<K>, nexus-kd<W>[-w<F>][-esft<K>][-sigmoid][-router][-attn<R>][-t<T>], nexus-offline-k<K>, lora-r<R>, lora[-attn|-experts]-r<R>-kd[<W>][-t<T>] or esft-token|gate-kd<W>"
    )


# -- data ------------------------------------------------------------------------------------


def demo_inputs(args) -> tuple[Path, Path]:
    """(corpus directory, model directory): ``--corpus-dir``/``--model``, else the cached demo
    of ``--size`` (built on first use)."""
    if args.model and args.corpus_dir:
        return Path(args.corpus_dir), Path(args.model)
    from nexus.demo import ensure_demo

    corpus_dir, model_dir = ensure_demo(args.size, progress=False)
    return Path(args.corpus_dir or corpus_dir), Path(args.model or model_dir)


def split_path(corpus_dir: Path, name: str) -> str:
    """The Parquet (or JSONL) file of demo-corpus split ``name``."""
    for ext in ("parquet", "jsonl"):
        if (corpus_dir / f"{name}.{ext}").is_file():
            return str(corpus_dir / f"{name}.{ext}")
    raise SystemExit(f"{corpus_dir} has no {name}.parquet or {name}.jsonl")


def default_seq_len(model_dir: Path, requested: int | None) -> int:
    """``requested``, else 256 capped at the model's positions."""
    from nexus.models.loading import load_config
    from nexus.util.preflight import max_positions

    return requested or min(256, max_positions(load_config(model_dir)) or 256)


def start_ray() -> bool:
    """A quiet local Ray instance (2 CPUs, no worker logs or progress bars) unless one is up;
    True if this call started it."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return started


def seeded_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Micro-batches of a seeded permutation of ``blocks``, cycling (reshuffled per epoch).

    Every method run with the same seed sees the same batches in the same order.
    """
    n = len(blocks) // batch_size * batch_size
    if n == 0:
        raise ValueError(f"{len(blocks)} training blocks are fewer than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(int(seed))
    while True:
        order = torch.randperm(len(blocks), generator=gen)[:n]
        for i in range(0, n, batch_size):
            yield blocks[order[i : i + batch_size]]


# -- offline KD targets ----------------------------------------------------------------------


def truncate(rows, k: int):
    """The top-k rows of sorted top-K rows: the first k entries, the rest widened by the others
    (exactly what the scorer would store at k)."""
    from nexus.stages.train.data import TeacherRows

    if k == rows.ids.shape[-1]:
        return rows
    rest = torch.logsumexp(torch.cat([rows.logp[..., k:], rows.rest.unsqueeze(-1)], dim=-1), dim=-1)
    return TeacherRows(rows.ids[..., :k], rows.logp[..., :k], rest)


def teacher_pass(model_dir, blocks: torch.Tensor, k: int, batch_size: int = 8):
    """Every block's teacher rows at top-``k`` (``nexus distill``'s scorer, in this process) and
    the scorer's tokens/s (model loading excluded)."""
    from nexus.stages.distill import TeacherScorer
    from nexus.stages.train.data import TeacherRows

    scorer = TeacherScorer(str(model_dir), seq_len=blocks.shape[1], top_k=k)
    parts, t0 = [], time.perf_counter()
    for i in range(0, len(blocks), batch_size):
        parts.append([torch.from_numpy(a) for a in scorer.score(blocks[i : i + batch_size])])
    seconds = time.perf_counter() - t0
    ids, logp, rest = (torch.cat(p) for p in zip(*parts))
    return TeacherRows(ids.long(), logp, rest), blocks.numel() / seconds


class TeacherTable:
    """Offline KD targets of a set of training blocks, at the largest top-k any method asks for;
    a method with a smaller k reads exact truncations (:func:`truncate`). Rows are found by the
    block's tokens, so every batch order (every seed) reads the right ones. Saved as safetensors
    next to the benchmark's other work files, so child processes load instead of scoring."""

    def __init__(self, blocks: torch.Tensor, rows) -> None:
        self.rows_all = rows
        self.index = {b.numpy().tobytes(): i for i, b in enumerate(blocks)}

    @classmethod
    def make(cls, model_dir, blocks: torch.Tensor, k: int, path: Path) -> TeacherTable:
        from safetensors.torch import load_file, save_file

        from nexus.stages.train.data import TeacherRows

        if path.is_file():
            t = load_file(str(path))
            if torch.equal(t["blocks"], blocks) and t["ids"].shape[-1] == k:
                return cls(blocks, TeacherRows(t["ids"].long(), t["logp"], t["rest"]))
        rows, tokens_per_s = teacher_pass(model_dir, blocks, k)
        print(f"teacher rows: {len(blocks)} blocks at top-{k}, {tokens_per_s:.0f} tokens/s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"blocks": blocks.contiguous(), "ids": rows.ids.int(), "logp": rows.logp, "rest": rows.rest},
                  str(path))  # fmt: skip
        return cls(blocks, rows)

    def rows(self, ids: torch.Tensor, k: int):
        """Teacher rows of the micro-batch ``ids`` [B, S] at top-``k``."""
        from nexus.stages.train.data import TeacherRows

        idx = torch.tensor([self.index[b.numpy().tobytes()] for b in ids])
        r = self.rows_all
        return truncate(TeacherRows(r.ids[idx], r.logp[idx], r.rest[idx]), k)


def blocks_read(n_blocks: int, batch_size: int, steps: int, seeds) -> torch.Tensor:
    """Indices of the blocks that ``steps`` batches of :func:`seeded_batches` read for any of
    ``seeds`` (what offline KD needs teacher rows for)."""
    index = torch.arange(n_blocks).unsqueeze(1)
    read = [
        b.flatten()
        for seed in seeds
        for b in itertools.islice(seeded_batches(index, batch_size, seed), steps)
    ]
    return torch.unique(torch.cat(read))


def teacher_k(methods) -> int:
    """The largest top-k of the offline-KD methods among ``methods`` (0: none)."""
    return max((m.teacher_k for m in methods if m.kd == "offline"), default=0)


# -- NEXUS initial adapters through the real pipeline stages ------------------------------------


class NexusInits:
    """Calibration statistics, selections and converted adapters, made once and cached in ``work``.

    ``sample`` (coverage sampling; skipped when ``sample_tokens`` is None) -> ``collect`` (router statistics) -> ``analyze`` (one
    selection per top-k) -> ``convert`` (one adapter per init, gate and top-k), each through
    the public stage function the pipeline calls. Several ``--shard`` processes may share
    ``work``: each step runs under an exclusive lock on ``work/inits.lock``, so the first
    process makes an output and the others find it (a stage refuses an output another process
    is writing).
    """

    def __init__(
        self,
        model_dir: str,
        corpus: list[str],
        work: Path,
        *,
        sample_tokens: int | None = 100_000,
        collect_tokens: int = 100_000,
        seq_len: int = 256,
        seed: int = 0,
    ) -> None:
        self.model_dir, self.corpus, self.work = str(model_dir), [str(c) for c in corpus], Path(work)
        self.sample_tokens, self.collect_tokens, self.seq_len, self.seed = (
            sample_tokens,
            collect_tokens,
            seq_len,
            seed,
        )
        self._selections: dict = {}
        self.seconds: dict[str, float] = {}
        self._held = False

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold ``work/inits.lock`` (re-entrant within this object: steps call each other)."""
        if self._held:  # an outer step holds it and releases it
            yield
            return
        self.work.mkdir(parents=True, exist_ok=True)
        with (self.work / "inits.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._held = True
            try:
                yield
            finally:
                self._held = False

    def stats_dir(self) -> Path:
        with self._exclusive():
            return self._stats_dir()

    def _stats_dir(self) -> Path:
        from nexus.stages import collect, sample

        out = self.work / "collect"
        if (out / "router_stats.json").is_file():
            return out
        source = self.corpus
        if self.sample_tokens:
            t = time.perf_counter()
            sample.run(
                corpus=self.corpus,
                model=self.model_dir,
                output=self.work / "sample",
                target_tokens=self.sample_tokens,
                max_doc_tokens=2048,
                seed=self.seed,
                overwrite=True,
            )
            self.seconds["sample"] = time.perf_counter() - t
            source = str(self.work / "sample")
        t = time.perf_counter()
        collect.run(
            model=self.model_dir,
            corpus=source,
            output=out,
            target_tokens=self.collect_tokens,
            seq_len=self.seq_len,
            seed=self.seed,
            overwrite=True,
            progress=False,
        )
        self.seconds["collect"] = time.perf_counter() - t
        return out

    def selection(self, top_k: int | None) -> dict:
        from nexus.stages import analyze

        with self._exclusive():
            if top_k in self._selections:
                return self._selections[top_k]
            out = self.work / f"analyze-top{top_k}"
            self._selections[top_k] = analyze.run(
                stats=self.stats_dir(),
                output=out,
                top_k=top_k,
                importance="pca",
                overwrite=True,
                model=self.model_dir,
                plots=False,
            )
            self._selections[top_k]["_path"] = str(out / "selection.json")
            return self._selections[top_k]

    def adapter(self, m: Method) -> Path:
        """The initial adapter of NEXUS variant ``m`` (its init, gate, top-k and width)."""
        from nexus.models.loading import load_config
        from nexus.planner.model import model_facts
        from nexus.stages import convert

        out = self.work / f"adapter-{adapter_key(m)}"
        with self._exclusive():
            if (out / "nexus_config.json").is_file():
                return out
            size = None
            if m.width != 1:  # a multiple of the routed experts' width, as nexus plan reads it
                size = round(m.width * model_facts(load_config(self.model_dir)).expert_width)
            convert.run(
                model=self.model_dir,
                output=out,
                selection=self.selection(m.top_k)["_path"],
                init=m.init,
                gate=m.gate,
                intermediate_size=size,
                overwrite=True,
            )
        return out

    def esft_experts(self, score: str, k: int) -> dict[int, list[int]]:
        """Per layer, the top-``k`` experts by the ESFT ``score`` (``frequency`` or ``gate``)."""
        from nexus.stages.analyze import select

        sel = self.selection(None)
        return {
            int(layer): select(entry["scores"][score], top_k=k) for layer, entry in sel["per_layer"].items()
        }


def adapter_key(m: Method) -> str:
    """What tells NEXUS variants' initial adapters apart (also their directory names)."""
    return f"{m.init}-{m.gate}-top{m.top_k}" + (f"-w{m.width:g}" if m.width != 1 else "")


class FixedInits:
    """Adapters and ESFT selections made earlier (by :class:`NexusInits`), e.g. in a parent process."""

    def __init__(self, adapters: dict[str, str], esft: dict[str, dict]) -> None:
        self.adapters, self.esft = adapters, esft

    @staticmethod
    def key(*parts) -> str:
        return "-".join(str(p) for p in parts)

    @classmethod
    def make(cls, inits: NexusInits, methods: list[Method]) -> FixedInits:
        adapters, esft = {}, {}
        for m in methods:
            if m.kind == "nexus" and m.init not in ("zero", "random"):
                adapters[adapter_key(m)] = str(inits.adapter(m))
            if m.kind == "esft" or m.unfreeze:
                k = m.unfreeze or m.esft_k
                esft[cls.key(m.esft_score, k)] = inits.esft_experts(m.esft_score, k)
        return cls(adapters, esft)

    def to_dict(self) -> dict:
        return {"adapters": self.adapters, "esft": self.esft}

    @classmethod
    def from_dict(cls, d: dict) -> FixedInits:
        return cls(
            d["adapters"], {k: {int(layer): v for layer, v in e.items()} for k, e in d["esft"].items()}
        )

    def adapter(self, m: Method) -> Path:
        return Path(self.adapters[adapter_key(m)])

    def esft_experts(self, score: str, k: int) -> dict[int, list[int]]:
        return self.esft[self.key(score, k)]


# -- building a method -----------------------------------------------------------------------


@dataclass
class Built:
    """A model ready to train with ``method``: the HF model, its trainable tensors, the config."""

    method: Method
    model: nn.Module
    cfg: TrainConfig
    trainable: list[nn.Parameter]
    #: ESFT: (parameter, boolean expert mask) of fused expert tensors whose other slices must not move
    masks: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    #: ESFT: experts trained per layer
    experts: dict[int, list[int]] = field(default_factory=dict)
    frozen_copy: list[torch.Tensor] = field(default_factory=list)
    #: ESFT with KD: per entry of ``masks``, the selected experts' original slices (the teacher)
    originals: list[torch.Tensor] = field(default_factory=list)
    #: offline KD: the teacher rows of the training blocks
    teacher: TeacherTable | None = None
    #: LoRA: the PEFT wrapper (its ``disable_adapter()`` is the KD teacher)
    peft: object | None = None

    @property
    def adapter_off(self) -> Callable[[], contextlib.AbstractContextManager] | None:
        """The context under which the model is its own KD teacher, for ``compute_losses``
        (None: NEXUS's default, its shared experts switched off)."""
        if self.method.kind == "nexus" and (self.peft is not None or self.originals):
            return partial(nexus_and_more_off, self)
        if self.peft is not None:
            return self.peft.disable_adapter
        if self.originals:
            return partial(original_experts, self)
        return None

    @property
    def trainable_params(self) -> int:
        masked = {id(p) for p, _ in self.masks}  # of these only the selected experts' slices count
        return sum(int(m.sum()) * p[0].numel() for p, m in self.masks) + sum(
            p.numel() for p in self.trainable if id(p) not in masked
        )


def train_config(method: Method, model_dir: str, *, seed: int, steps: int, batch_size: int, seq_len: int,
                 warmup_steps: int, **kw) -> TrainConfig:  # fmt: skip
    """The ``nexus train`` settings of one run (validated like the CLI's)."""
    cfg = TrainConfig(
        model=str(model_dir),
        corpus=["(in memory)"],
        output="(in memory)",
        init=method.init if method.init in ("zero", "random") else "zero",
        gate=method.gate,
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=method.lr,
        warmup_steps=warmup_steps,
        kd_weight=method.kd_weight,
        kd_temperature=method.temperature,
        kd=method.kd,
        train_router=method.train_router,
        seed=seed,
        dtype="float32",
        **kw,
    )
    return cfg


def build(
    method: Method,
    cfg: TrainConfig,
    inits: NexusInits | FixedInits | None = None,
    teacher: TeacherTable | None = None,
) -> Built:
    """Load the base and make ``method``'s parameters (and only those) trainable; ``teacher``:
    the training blocks' rows for offline KD."""
    from nexus.models.loading import load_model
    from nexus.stages.train.core import enable_checkpointing, prepare_model

    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    if method.kind == "nexus":
        if method.init not in ("zero", "random"):
            if inits is None:
                raise ValueError(f"init {method.init} needs router statistics (NexusInits)")
            cfg = TrainConfig.build(cfg, adapter=str(inits.adapter(method)))
        if method.kd == "offline" and teacher is None:
            raise ValueError(f"{method.name} trains with offline KD: pass the TeacherTable of its blocks")
        model = prepare_model(cfg, device)
        built = Built(method, model, cfg, [], teacher=teacher)
        if method.unfreeze:
            unfreeze_experts(built, inits, method.esft_score, method.unfreeze)
        if method.attn_rank:
            shared = [p for p in model.parameters() if p.requires_grad]
            add_lora(built, method.attn_rank, "attn")  # (PEFT freezes every other parameter)
            for p in shared:
                p.requires_grad_(True)
        built.trainable = [p for p in built.model.parameters() if p.requires_grad]
        return built
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    model.requires_grad_(False)
    built = Built(method, model, cfg, [])
    if method.kind == "lora":
        add_lora(built, method.rank, method.lora_on)
        model = built.model
    elif method.kind == "esft":
        unfreeze_experts(built, inits, method.esft_score, method.esft_k)
    elif method.kind == "full":
        model.requires_grad_(True)
    built.trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    return built


def add_lora(built: Built, rank: int, on: str) -> None:
    """PEFT LoRA of ``rank`` on ``on`` (a key of :data:`LORA_TARGETS`), alpha = 2 x rank."""
    from peft import LoraConfig, get_peft_model

    modules, parameters = LORA_TARGETS[on]
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules, target_parameters=parameters
    )
    peft_model = get_peft_model(built.model, lora)
    # LoRA layers are injected in place: the inner HF model now computes base + LoRA
    built.model = peft_model.get_base_model()
    built.peft = peft_model  # keep the wrapper alive


def unfreeze_experts(built: Built, inits, score: str, k: int) -> None:
    """Make each layer's top-``k`` experts by ESFT ``score`` trainable: the fused expert tensors
    get gradients masked to those experts' slices (the rest are checked unchanged after
    training), and with KD their original slices are kept as the teacher's."""
    if inits is None:
        raise ValueError("ESFT selects experts from router statistics (NexusInits)")
    if built.cfg.weight_decay:
        raise ValueError("ESFT's gradient masks need weight_decay 0 (decay would move frozen experts)")
    from nexus.models import find_moe_blocks

    built.experts = inits.esft_experts(score, k)
    for block in find_moe_blocks(built.model):
        mask = torch.zeros(block.num_experts, dtype=torch.bool)
        mask[built.experts[block.layer]] = True
        for name, p in block.experts.named_parameters(recurse=False):
            if p.shape[0] != block.num_experts:
                raise ValueError(f"expert tensor {name} is not stacked by expert: {tuple(p.shape)}")
            p.requires_grad_(True)
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.register_hook(partial(_mask_grad, mask=mask.to(p.dtype).reshape(shape)))
            built.masks.append((p, mask))
            built.frozen_copy.append(p.detach()[~mask].clone())
            if built.method.kd_weight:  # the teacher: only the trained experts' original weights
                built.originals.append(p.detach()[mask].clone())


def _mask_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask


@contextlib.contextmanager
def original_experts(built: Built) -> Iterator[None]:
    """Inside this block ESFT's trained experts hold their original weights (the model is the
    base again: ESFT's KD teacher); on exit their trained values are back, bit for bit.

    The swap writes the parameters in place, which autograd allows only because nothing
    saved for backward reads them across it: ``compute_losses`` runs the teacher forward
    (under ``no_grad``, inside this block) before the student forward, and each micro-batch's
    backward finishes before the next teacher forward. The trained values are copied aside
    for the block (one expert per layer, small), instead of keeping a second model.
    """
    with torch.no_grad():
        trained = [p.detach()[mask].clone() for p, mask in built.masks]
        for (p, mask), original in zip(built.masks, built.originals, strict=True):
            p[mask] = original
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, mask), values in zip(built.masks, trained):
                p[mask] = values


@contextlib.contextmanager
def nexus_and_more_off(built: Built) -> Iterator[None]:
    """NEXUS that trains more than its shared experts: its teacher is the base, i.e. the shared
    experts off, and attention LoRA off (``attn_rank``) or the unfrozen routed experts at their
    original weights (``unfreeze``)."""
    from nexus.method.attach import shared_experts_disabled

    lora_off = built.peft.disable_adapter() if built.peft is not None else contextlib.nullcontext()
    experts_off = original_experts(built) if built.originals else contextlib.nullcontext()
    with shared_experts_disabled(built.model), lora_off, experts_off:
        yield


def check_esft_frozen(built: Built) -> None:
    """The unselected experts of an ESFT run must be bitwise unchanged."""
    for (p, mask), before in zip(built.masks, built.frozen_copy):
        if not torch.equal(p.detach()[~mask], before):
            raise AssertionError("ESFT moved an expert it was not meant to train")


# -- the shared training loop ----------------------------------------------------------------


@dataclass
class StepRecord:
    step: int
    loss: float
    ce: float
    kd: float
    lr: float
    grad_norm: float
    seconds: float
    tokens: int


class Stepper:
    """Optimizer steps of ``built`` one at a time, exactly as :mod:`nexus.stages.train.loop` computes
    them on one worker (same loss code, optimiser, schedule and clipping)."""

    def __init__(
        self,
        built: Built,
        batches: Iterator[torch.Tensor],
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        device: torch.device | None = None,
    ) -> None:
        from nexus.stages.train.core import Backbone, BaseRouters, make_optimizer

        cfg = built.cfg
        self.built, self.batches, self.device = built, batches, device
        self.autocast = autocast or contextlib.nullcontext
        self.student = Backbone(built.model)
        self.optimizer, self.scheduler = make_optimizer(built.trainable, cfg)
        self.base_routers = BaseRouters.for_config(built.model, cfg)
        self.step_count = 0

    def step(self) -> StepRecord:
        from nexus.stages.train.core import optimizer_step

        cfg, model, trainable = self.built.cfg, self.built.model, self.built.trainable
        t0 = time.perf_counter()
        micro_batches = []
        for _ in range(cfg.grad_accum):
            ids = next(self.batches)
            micro_batches.append(ids if self.device is None else ids.to(self.device, non_blocking=True))
        method = self.built.method
        teachers = None
        if method.kd == "offline":  # reading the stored rows is part of the step (timed)
            teachers = [self.built.teacher.rows(ids.cpu(), method.teacher_k) for ids in micro_batches]
            if self.device is not None:
                teachers = [t.to(self.device) for t in teachers]
        res = optimizer_step(
            model, self.student, micro_batches, cfg, self.optimizer, self.scheduler, trainable,
            base_routers=self.base_routers, autocast=self.autocast, teachers=teachers,
            adapter_off=self.built.adapter_off,
        )  # fmt: skip
        ce, kd, lr, grad_norm, tokens = res.ce, res.kd, res.lr, res.grad_norm, res.tokens
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_count += 1
        loss = ce + cfg.kd_weight * kd
        rec = StepRecord(self.step_count, loss, ce, kd, lr, grad_norm, time.perf_counter() - t0, tokens)
        if not math.isfinite(rec.loss):
            raise FloatingPointError(
                f"{self.built.method.name}: loss is {rec.loss} at step {self.step_count}"
            )
        return rec


def train(
    built: Built,
    batches: Iterator[torch.Tensor],
    *,
    on_step: Callable[[StepRecord], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    device: torch.device | None = None,
) -> list[StepRecord]:
    """``cfg.total_steps`` optimizer steps of ``built`` (see :class:`Stepper`)."""
    stepper = Stepper(built, batches, autocast=autocast, device=device)
    records = []
    for _ in range(built.cfg.total_steps):
        rec = stepper.step()
        records.append(rec)
        if on_step is not None:
            on_step(rec)
    return records


# -- memory ------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux ``clear_refs`` 5); False if unsupported."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next peak is its own
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(peak: bool = False) -> int:
    """Current (or peak since the last reset) resident set size of this process, in bytes."""
    key = "VmHWM" if peak else "VmRSS"
    try:
        return rss_parts()[key]
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts() -> dict[str, int]:
    """This process's ``/proc/self/status`` memory lines in bytes: ``VmRSS``, ``VmHWM`` and the
    split of the resident set into ``RssAnon`` (heap, tensors allocated by the process) and
    ``RssFile`` (pages of mapped files, such as safetensors shards whose tensors are used in
    place; clean, so the kernel may drop them and read them again)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(Vm\w+|Rss\w+):\s+(\d+) kB", text, re.M)}


def run_child(script: str | Path, spec: dict, threads: int, what: str) -> dict:
    """Run ``python SCRIPT --child SPEC.json`` in a fresh process (its memory and timings its
    own) with ``threads`` intra-op threads; returns the JSON it wrote to ``spec["out"]``.

    Children run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then returns every large freed
    buffer to the OS, so the peak RSS follows the live tensors instead of the allocator's
    caching (which otherwise varies by 100-200 MB with the order of allocations).
    """
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "out.json")}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        proc = subprocess.run(
            [sys.executable, str(script), "--child", str(Path(tmp) / "spec.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(spec["out"]).read_text())
