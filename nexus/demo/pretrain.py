"""Pretrain the demo base model: transformers' own ``GptOssForCausalLM``, on CPU, from scratch.

The model keeps everything that makes GPT-OSS what it is (attention sinks, biases,
alternating sliding/full attention, the clamped SwiGLU experts with interleaved gate/up,
top-k softmax routing), only small. It is trained on the **general** split of the demo
corpus (packed sequences, AdamW, linear warmup then cosine decay, a switch-style
load-balancing loss so the routers use every expert) and evaluated on both held-out splits.

A build is a pure function of (corpus, size, seed): same inputs, same thread count, same
library versions give bit-identical weights. Steps are fixed per size (never "train until
the clock runs out"), which is what makes that possible.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from nexus.data.packing import join_documents, pack_blocks
from nexus.demo import corpus as corpus_mod
from nexus.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer, train_tokenizer
from nexus.errors import NexusError

#: bump when training or evaluation changes, so cached models are rebuilt
MODEL_VERSION = 1
#: bump when the MXFP4 variant's writing changes (its base is keyed by MODEL_VERSION)
MXFP4_VERSION = 1
METADATA = "demo_metadata.json"
#: how the demo base stores its experts: as trained, or in MXFP4 like the published GPT-OSS
FORMATS = ("float32", "mxfp4")


@dataclass(frozen=True)
class DemoSize:
    """Model shape and training recipe of one demo size."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_width: int
    sliding_window: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    #: weight of the per-layer load-balancing loss (see :func:`balance_loss`)
    balance_coef: float = 0.05
    #: characters of general text the tokenizer and the training stream are made from (None: all)
    tokenizer_chars: int | None = None
    train_chars: int | None = None
    #: held-out tokens evaluated per split (cap)
    eval_tokens: int = 65_536
    #: transformers experts path; "grouped_mm" measured fastest on CPU (docs/demo.md)
    experts_implementation: str = "grouped_mm"
    #: intra-op threads while building: fixed, because results are bit-identical only for a
    #: fixed thread count, and because on a shared or small machine one thread avoids
    #: OpenMP oversubscription, which costs far more than a second thread gains (docs/demo.md)
    threads: int = 1


SIZES: dict[str, DemoSize] = {
    # for tests: a few seconds of training; the numbers are not meant to be good
    "tiny": DemoSize(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=4,
        top_k=2,
        expert_width=64,
        sliding_window=32,
        seq_len=64,
        batch_size=8,
        steps=120,
        lr=3e-3,
        tokenizer_chars=200_000,
        train_chars=200_000,
        eval_tokens=4096,
    ),
    # the main job's default: within 10 minutes on a 2-core CPU (docs/demo.md has the numbers)
    "small": DemoSize(
        vocab_size=4096,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        num_experts=8,
        top_k=2,
        expert_width=256,
        sliding_window=128,
        seq_len=256,
        batch_size=16,
        steps=256,
        lr=3e-3,
        eval_tokens=65_536,
    ),
    # the quality benchmark's second scale (not used by the job or CI): 28 M parameters,
    # ~6x the small base, about half an hour on one CPU thread (docs/benchmarks.md)
    "medium": DemoSize(
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        num_experts=16,
        top_k=2,
        expert_width=512,
        sliding_window=128,
        seq_len=256,
        batch_size=16,
        steps=384,
        lr=2e-3,
        eval_tokens=65_536,
    ),
}


def size_config(size: str) -> DemoSize:
    if size not in SIZES:
        raise NexusError(f"unknown demo size '{size}'; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def model_config(cfg: DemoSize):
    """The ``GptOssConfig`` of a demo size."""
    from transformers import GptOssConfig

    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_layers)]
    return GptOssConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_width,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        sliding_window=cfg.sliding_window,
        layer_types=layer_types,
        max_position_embeddings=cfg.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        use_cache=True,
    )


def build_key(corpus_sha256: str, size: str, seed: int) -> str:
    """Cache key of a demo model: corpus content, recipe, seed and code version."""
    from nexus.util.artifacts import sha256_json

    return sha256_json(
        {
            "corpus": corpus_sha256,
            "size": size,
            "recipe": dataclasses.asdict(size_config(size)),
            "seed": seed,
            "version": MODEL_VERSION,
        }
    )


# ----------------------------------------------------------------------------- data


def _take_chars(texts: list[str], limit: int | None) -> list[str]:
    if limit is None:
        return texts
    out, total = [], 0
    for t in texts:
        if total >= limit:
            break
        out.append(t)
        total += len(t)
    return out


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each followed by ``<|eos|>`` (1-D int64)."""
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return torch.from_numpy(join_documents((enc.ids for enc in encodings), EOS_ID))


def pack(stream: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[N, seq_len]`` blocks of the stream, as ``nexus train`` packs them (the remainder is dropped)."""
    blocks = pack_blocks(stream.numpy(), seq_len, max_tokens)
    if len(blocks) == 0:
        raise NexusError(f"not enough text for one sequence of {seq_len} tokens")
    return torch.from_numpy(blocks)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model, blocks: torch.Tensor, batch_size: int = 16, unigram_logp: torch.Tensor | None = None
) -> dict:
    """Perplexity of ``model`` on packed ``blocks``, router entropy and expert shares per MoE layer.

    Entropy is of the full softmax over the router logits (nats), compared with log(E);
    shares are each expert's fraction of top-k selections.
    """
    was_training = model.training
    model.eval()
    cfg = model.config
    num_experts, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
    nll = 0.0
    uni = 0.0
    count = 0
    ent = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    sel = torch.zeros(cfg.num_hidden_layers, num_experts, dtype=torch.float64)
    routed = 0
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start : start + batch_size]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        target = x[:, 1:]
        nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
        if unigram_logp is not None:
            uni -= unigram_logp[target].sum().item()
        count += target.numel()
        for layer, logits in enumerate(out.router_logits):
            logits = logits.float().reshape(-1, num_experts)
            p = torch.softmax(logits, dim=-1)
            ent[layer] += -(p * torch.log(p.clamp_min(1e-30))).sum().item()
            idx = torch.topk(logits, top_k, dim=-1).indices
            sel[layer] += torch.bincount(idx.reshape(-1), minlength=num_experts).double()
        routed += x.numel()
    model.train(was_training)
    result = {
        "tokens": count,
        "nll": nll / count,
        "perplexity": math.exp(nll / count),
        "router": [
            {
                "layer": layer,
                "entropy": ent[layer].item() / routed,
                "log_num_experts": math.log(num_experts),
                "expert_shares": [round(v, 6) for v in (sel[layer] / (routed * top_k)).tolist()],
            }
            for layer in range(cfg.num_hidden_layers)
        ],
    }
    if unigram_logp is not None:
        result["unigram_perplexity"] = math.exp(uni / count)
    return result


def unigram_log_probs(stream: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities of the training stream."""
    counts = torch.bincount(stream, minlength=vocab_size).double() + 1.0
    return torch.log(counts / counts.sum())


def check_bars(general: dict, domain: dict) -> dict:
    """The issue's bars for the ``small`` model, evaluated on held-out general/domain results."""
    collapsed = []
    for layer in general["router"]:
        if not layer["entropy"] < layer["log_num_experts"] or min(layer["expert_shares"]) <= 0:
            collapsed.append(layer["layer"])
    return {
        "general_ppl_at_most_half_unigram": general["perplexity"] <= 0.5 * general["unigram_perplexity"],
        "domain_ppl_above_general_ppl": domain["perplexity"] > general["perplexity"],
        "domain_over_general_ppl_ratio": domain["perplexity"] / general["perplexity"],
        "routers_not_collapsed": not collapsed,
        "collapsed_layers": collapsed,
    }


# ----------------------------------------------------------------------------- training


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing, **per layer**, averaged over layers (1.0 when balanced).

    For each layer, E * sum_e f_e * P_e, where f_e is expert e's share of the top-k
    selections and P_e its mean router probability. (transformers' own
    ``load_balancing_loss_func`` pools the selections of all layers into one histogram, so
    it only balances "expert e summed over layers" and lets every single layer collapse.)
    """
    losses = []
    for logits in router_logits:
        logits = logits.float().reshape(-1, logits.shape[-1])
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():
            idx = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
            share = torch.bincount(idx, minlength=num_experts).float() / idx.numel()
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _lr_lambda(cfg: DemoSize):
    """``nexus train``'s schedule (linear warmup, cosine to ``min_lr_frac``) over ``cfg.steps``."""
    from nexus.stages.train.schedule import lr_factor

    warmup = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    return partial(lr_factor, warmup_steps=warmup, total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_frac)


def _optimizer(model, cfg: DemoSize):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def train(
    model, blocks: torch.Tensor, cfg: DemoSize, seed: int, progress: bool = True, desc: str = ""
) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps on shuffled ``blocks``; returns a log."""
    from tqdm.auto import tqdm

    model.train()
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=gen)
    pos, epochs = 0, 1
    top_k = model.config.num_experts_per_tok
    curve: list[list[float]] = []
    tokens = 0
    bar = tqdm(total=cfg.steps, desc=desc or "pretrain", unit="step", disable=not progress, file=sys.stderr)
    start, cpu_start = time.perf_counter(), time.process_time()
    ce = aux = float("nan")
    for step in range(cfg.steps):
        if pos + cfg.batch_size > blocks.shape[0]:
            order = torch.randperm(blocks.shape[0], generator=gen)
            pos, epochs = 0, epochs + 1
        x = blocks[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1]
        ce_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        aux_loss = balance_loss(out.router_logits, top_k)
        (ce_loss + cfg.balance_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ce, aux = ce_loss.item(), aux_loss.item()
        tokens += x.numel()
        elapsed = time.perf_counter() - start
        if step % 10 == 0 or step == cfg.steps - 1:
            curve.append([step, round(ce, 4), round(aux, 4), round(elapsed, 2)])
        bar.set_postfix(
            loss=f"{ce:.3f}", aux=f"{aux:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}", refresh=False
        )
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return {
        "steps": cfg.steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        # CPU time of this process: what the training costs without other load on the machine
        "cpu_seconds": round(cpu_seconds, 2),
        "tokens_per_cpu_second": round(tokens / cpu_seconds, 1),
        "epochs": round(cfg.steps * cfg.batch_size / blocks.shape[0], 3),
        "distinct_blocks": int(blocks.shape[0]),
        "final_loss": round(ce, 4),
        "final_aux_loss": round(aux, 4),
        "loss_curve": {"columns": ["step", "loss", "aux_loss", "seconds"], "rows": curve},
    }


# ----------------------------------------------------------------------------- build


def _resolve_corpus(corpus) -> tuple[str, dict[str, list[str]]]:
    """(content hash, split -> texts) from a DemoCorpus, a demo corpus directory, or None (gather)."""
    if corpus is None:
        corpus = corpus_mod.gather_corpus()
    if isinstance(corpus, corpus_mod.DemoCorpus):
        return corpus.sha256, {s: corpus.texts(s) for s in corpus_mod.SPLITS}
    manifest = corpus_mod.read_manifest(corpus)
    return manifest["content_sha256"], {s: corpus_mod.read_split(corpus, s) for s in corpus_mod.SPLITS}


def build_demo_model(
    out: str | os.PathLike,
    size: str = "small",
    seed: int = 0,
    corpus=None,
    overwrite: bool = False,
    progress: bool = True,
    format: str = "float32",
) -> Path:
    """Build the demo base model of ``size`` into ``out`` (atomically) and return ``out``.

    ``corpus``: a :class:`~nexus.demo.corpus.DemoCorpus`, a directory written by
    ``nexus demo-corpus``, or None to gather the standard library now. ``format``:
    ``float32`` (as trained) or ``mxfp4`` (the same base, its experts quantised and stored
    like the published GPT-OSS checkpoints; see :func:`write_mxfp4_demo`).
    """
    import tempfile

    from nexus.util.artifacts import check_output_dir

    cfg = size_config(size)
    check_format(format)
    check_output_dir(out, overwrite)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        if format == "float32":
            return _build(out, size, cfg, seed, corpus, overwrite, progress)
        with tempfile.TemporaryDirectory(prefix="nexus-demo-base-") as tmp:
            base = _build(Path(tmp) / "base", size, cfg, seed, corpus, False, progress)
            return write_mxfp4_demo(base, out, corpus=corpus, overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise NexusError(f"unknown demo model format '{format}'; choose one of {', '.join(FORMATS)}")
    return format


def mxfp4_build_key(base_key: str) -> str:
    """Cache key of the MXFP4 variant of the demo base with build key ``base_key``."""
    from nexus.util.artifacts import sha256_json

    return sha256_json({"base": base_key, "format": "mxfp4", "version": MXFP4_VERSION})


def write_mxfp4_demo(
    base_dir: str | os.PathLike, out: str | os.PathLike, *, corpus=None, overwrite=False
) -> Path:
    """Write the demo base in ``base_dir`` with its experts in MXFP4 into ``out`` (atomically).

    The experts are quantised from the trained weights (never retrained) and stored exactly
    as the published GPT-OSS checkpoints store theirs (:func:`nexus.weights.mxfp4.save_gpt_oss_mxfp4`:
    tensor names, shapes, bf16 for everything else, ``quantization_config``), so a job on it
    takes the path a real GPT-OSS checkpoint takes. The held-out perplexities in its metadata
    are measured on the quantised model (packed experts); the base's are kept alongside.
    """
    import shutil

    from transformers import GptOssForCausalLM

    from nexus.models.loading import load_model, load_tokenizer
    from nexus.util.artifacts import atomic_dir, write_json
    from nexus.weights.mxfp4 import save_gpt_oss_mxfp4

    base_dir = Path(base_dir)
    base = read_metadata(base_dir)
    cfg = size_config(base["size"])
    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_gpt_oss_mxfp4(model, tmp)
        for f in base_dir.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
        _, texts = _resolve_corpus(corpus)
        tok = load_tokenizer(tmp)
        packed = load_model(tmp, experts="packed")
        heldout = {
            name: evaluate(packed, pack(encode_stream(tok, texts[split]), cfg.seq_len, cfg.eval_tokens))
            for name, split in (
                ("general", corpus_mod.GENERAL_HELDOUT),
                ("domain", corpus_mod.DOMAIN_HELDOUT),
            )
        }
        summary = {
            **base["summary"],
            "general_perplexity": round(heldout["general"]["perplexity"], 3),
            "domain_perplexity": round(heldout["domain"]["perplexity"], 3),
            **_router_summary(heldout["general"]),
            "float32_general_perplexity": base["summary"]["general_perplexity"],
            "float32_domain_perplexity": base["summary"]["domain_perplexity"],
        }
        metadata = {
            **base,
            "format": "nexus-demo-model",
            "experts_format": "mxfp4",
            "build_key": mxfp4_build_key(base["build_key"]),
            "quantized_from": {"build_key": base["build_key"], "model": base_dir.name},
            "heldout": heldout,
            "summary": summary,
            "mxfp4_seconds": round(time.perf_counter() - t0, 2),
            "command": base["command"] + " --mxfp4",
        }
        write_json(tmp / METADATA, metadata)
    return Path(out)


def _build(out, size: str, cfg: DemoSize, seed: int, corpus, overwrite: bool, progress: bool) -> Path:
    from transformers import GptOssForCausalLM

    from nexus.util.artifacts import atomic_dir, write_json

    t0, cpu0 = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 2)
        return now

    sha, texts = _resolve_corpus(corpus)
    t = lap("corpus", t0)
    general = _take_chars(texts[corpus_mod.GENERAL], cfg.train_chars)
    tok = train_tokenizer(
        _take_chars(texts[corpus_mod.GENERAL], cfg.tokenizer_chars),
        cfg.vocab_size,
        model_max_length=cfg.seq_len,
    )
    t = lap("tokenizer", t)
    stream = encode_stream(tok, general)
    blocks = pack(stream, cfg.seq_len)
    eval_blocks = {
        name: pack(encode_stream(tok, texts[name]), cfg.seq_len, cfg.eval_tokens)
        for name in (corpus_mod.GENERAL_HELDOUT, corpus_mod.DOMAIN_HELDOUT)
    }
    unigram = unigram_log_probs(stream, cfg.vocab_size)
    t = lap("encode", t)

    torch.manual_seed(seed)
    config = model_config(cfg)
    config._experts_implementation = cfg.experts_implementation
    model = GptOssForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log = train(model, blocks, cfg, seed, progress=progress, desc=f"demo-model {size}")
    t = lap("train", t)

    general_eval = evaluate(model, eval_blocks[corpus_mod.GENERAL_HELDOUT], unigram_logp=unigram)
    domain_eval = evaluate(model, eval_blocks[corpus_mod.DOMAIN_HELDOUT], unigram_logp=unigram)
    t = lap("evaluate", t)

    metadata = {
        "format": "nexus-demo-model",
        "version": MODEL_VERSION,
        "size": size,
        "seed": seed,
        "build_key": build_key(sha, size, seed),
        "corpus_sha256": sha,
        "recipe": dataclasses.asdict(cfg),
        "parameters": n_params,
        "active_parameters_per_token": _active_params(model, cfg),
        "training": {
            **log,
            "train_tokens_available": int(stream.numel()),
            "threads": torch.get_num_threads(),
            "experts_implementation": cfg.experts_implementation,
        },
        "heldout": {
            "general": general_eval,
            "domain": domain_eval,
        },
        "summary": {
            "general_perplexity": round(general_eval["perplexity"], 3),
            "domain_perplexity": round(domain_eval["perplexity"], 3),
            "unigram_perplexity_general": round(general_eval["unigram_perplexity"], 3),
            "unigram_perplexity_domain": round(domain_eval["unigram_perplexity"], 3),
            "log_num_experts": round(math.log(cfg.num_experts), 4),
            **_router_summary(general_eval),
        },
        "bars": check_bars(general_eval, domain_eval),
        "versions": _versions(),
        "command": " ".join(["nexus", "demo-model", "--size", size, "--seed", str(seed)]),
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        save_tokenizer(tok, tmp)
        phases["save"] = round(time.perf_counter() - t, 2)
        metadata["phases_seconds"] = phases
        metadata["build_seconds"] = round(time.perf_counter() - t0, 2)
        metadata["build_cpu_seconds"] = round(time.process_time() - cpu0, 2)
        metadata["load_average"] = _load_average()
        write_json(tmp / METADATA, metadata)
    return Path(out)


def _router_summary(general_eval: dict) -> dict:
    router = general_eval["router"]
    return {
        "mean_router_entropy": round(sum(r["entropy"] for r in router) / len(router), 4),
        "min_expert_share": min(min(r["expert_shares"]) for r in router),
    }


def _active_params(model, cfg: DemoSize) -> int:
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            total += p.numel() * cfg.top_k // cfg.num_experts
        elif "embed_tokens" not in name:
            total += p.numel()
    return total


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages at the end of the build (context for the timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _versions() -> dict:
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def read_metadata(model_dir: str | os.PathLike) -> dict:
    from nexus.util.artifacts import read_json

    return read_json(Path(model_dir) / METADATA, "demo model metadata")


def summary_lines(metadata: dict) -> list[str]:
    """A short human-readable summary of a demo build."""
    s, tr = metadata["summary"], metadata["training"]
    lines = [
        f"size {metadata['size']}: {metadata['parameters'] / 1e6:.2f}M parameters, "
        f"{tr['tokens']:,} training tokens in {tr['seconds']:.0f}s ({tr['tokens_per_second']:,.0f} tokens/s, "
        f"{tr['tokens_per_cpu_second']:,.0f} per CPU-second), build {metadata['build_seconds']:.0f}s",
        f"held-out perplexity: general {s['general_perplexity']:.2f} (unigram {s['unigram_perplexity_general']:.1f}), "
        f"domain {s['domain_perplexity']:.2f} (unigram {s['unigram_perplexity_domain']:.1f})",
        f"router entropy (mean over layers) {s['mean_router_entropy']:.3f} vs log(E) {s['log_num_experts']:.3f}; "
        f"smallest expert share {s['min_expert_share']:.4f}",
    ]
    return lines
