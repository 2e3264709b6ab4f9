"""Stage 6: held-out perplexity of the base and the specialised model, and sample generations.

Each named corpus (``domain``, ``general``, ...) is tokenised and packed exactly like the
training data; perplexity is exp(mean next-token NLL) over every predicted token, with the
token count reported next to it. Base and specialised numbers come from the same model
object: the specialised run loads the adapter, the base run is the same model inside
``shared_experts_disabled``, so the comparison cannot be confounded by a second load.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from nexus.artifacts import atomic_dir, claims_released, write_json
from nexus.errors import NexusError

log = logging.getLogger(__name__)
EVAL_FILE = "evaluation.json"


def parse_corpora(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=PATH`` (or plain ``PATH``, named after the file) into ``{name: [paths]}``."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem or "corpus", spec
        if not name or not path:
            raise NexusError(f"bad corpus spec '{spec}'; use NAME=PATH")
        out.setdefault(name, []).append(path)
    return out


def packed_blocks(
    paths: list[str],
    model_dir: str,
    seq_len: int,
    max_tokens: int | None = None,
    text_field: str = "text",
    trust_remote_code: bool = False,
    skipped=None,
) -> torch.Tensor:
    """Packed ``[N, seq_len]`` int64 blocks exactly as ``nexus train`` builds them (Ray Data),
    the first ``max_tokens`` worth (at least one block) or all of them. ``skipped``: a
    :class:`nexus.corpus.SkippedDocuments` to skip damaged documents into."""
    from nexus.train.data import packed_dataset

    ds = packed_dataset(
        [str(p) for p in paths],
        str(model_dir),
        seq_len=seq_len,
        text_field=text_field,
        trust_remote_code=trust_remote_code,
        skipped=skipped,
    )
    if max_tokens is not None:
        ds = ds.limit(max(1, max_tokens // seq_len))
    rows = ds.take_all()
    return torch.stack([torch.from_numpy(np.array(r["input_ids"], dtype=np.int64)) for r in rows])


def perplexity(model, blocks: torch.Tensor, *, batch_size: int = 8, device="cpu") -> tuple[float, int]:
    """(perplexity, predicted tokens) of ``model`` on packed ``blocks`` [N, S]."""
    from nexus.train.core import evaluate_sums

    batches = [blocks[i : i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
    nll, n = evaluate_sums(model, batches)
    return math.exp(nll / max(n, 1)), n


def generate_samples(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int = 40, seed: int = 0
) -> list[str]:
    """Sampled continuations (temperature 0.8, fixed seed) so before/after are comparable."""
    outs = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        torch.manual_seed(seed + i)
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                pad_token_id=tokenizer.pad_token_id,
            )
        outs.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return outs


def default_prompts(blocks: torch.Tensor, tokenizer, n: int = 3, tokens: int = 24) -> list[str]:
    step = max(1, len(blocks) // n)
    return [tokenizer.decode(blocks[i * step, :tokens]) for i in range(min(n, len(blocks)))]


@claims_released()
def evaluate(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    corpora: dict[str, list[str]],
    output: str | os.PathLike | None = None,
    *,
    seq_len: int = 256,
    max_tokens: int = 65536,
    batch_size: int = 8,
    text_field: str = "text",
    prompts: list[str] | None = None,
    prompt_corpus: str | None = None,
    generate_tokens: int = 40,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    skip_bad_documents: bool = False,
    experts: str = "auto",
) -> dict:
    """Perplexity per corpus for base and (with ``adapter_dir``) specialised; optional output dir.

    ``skip_bad_documents``: skip damaged documents of the corpora (counted in the results,
    ``skipped_documents``) instead of stopping at the first. ``experts``: how the routed experts
    are held (``auto``, ``packed``, ``dequantized``; see :func:`nexus.loading.load_model`).
    """
    from nexus.adapter import load_adapter
    from nexus.artifacts import claim_output
    from nexus.attach import shared_experts_disabled
    from nexus.corpus import check_corpus_files, resolve_corpus, skipped_documents
    from nexus.loading import load_config, load_model, load_tokenizer, resolve_experts
    from nexus.preflight import check_adapter_matches, check_device, check_seq_len, check_weights
    from nexus.ray_utils import ensure_ray

    if not corpora:
        raise NexusError("no evaluation corpus given; pass --corpus NAME=PATH")
    if seq_len <= 0 or max_tokens <= 0 or batch_size <= 0:
        raise NexusError("seq_len, max_tokens and batch_size must be positive")
    # everything the user can get wrong is checked before the model is loaded
    if output is not None:
        claim_output(output, overwrite)
    check_device(device)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    experts = resolve_experts(config, experts, model=model_dir)
    check_seq_len(config, seq_len)
    check_weights(model_dir)
    if adapter_dir is not None:
        check_adapter_matches(adapter_dir, config)
    for paths in corpora.values():
        check_corpus_files(resolve_corpus(paths), text_field, skip_bad_documents)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    ensure_ray()
    skipped = skipped_documents(skip_bad_documents)
    # the corpora are read before the model loads: a damaged document stops the stage early
    blocks = {
        name: packed_blocks(paths, model_dir, seq_len, max_tokens, text_field, trust_remote_code, skipped)
        for name, paths in corpora.items()
    }
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    model = load_model(
        model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code, experts=experts
    )
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    results: dict = {
        "model": str(model_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "experts": experts,
        "seq_len": seq_len,
        "corpora": {},
        **({"skipped_documents": skip_record} if skip_record is not None else {}),
    }
    for name, b in blocks.items():
        with shared_experts_disabled(model):
            base_ppl, n = perplexity(model, b, batch_size=batch_size, device=device)
        row = {"tokens": n, "base_ppl": base_ppl}
        if adapter_dir is not None:
            row["specialised_ppl"], _ = perplexity(model, b, batch_size=batch_size, device=device)
            row["change_pct"] = 100.0 * (row["specialised_ppl"] / base_ppl - 1.0)
        results["corpora"][name] = row
    source = prompt_corpus if prompt_corpus in blocks else next(iter(blocks))
    prompts = prompts or default_prompts(blocks[source], tokenizer)
    with shared_experts_disabled(model):
        before = generate_samples(model, tokenizer, prompts, max_new_tokens=generate_tokens)
    results["generations"] = [{"prompt": p, "base": b} for p, b in zip(prompts, before)]
    if adapter_dir is not None:
        after = generate_samples(model, tokenizer, prompts, max_new_tokens=generate_tokens)
        for row, text in zip(results["generations"], after):
            row["specialised"] = text
    if output is not None:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            write_json(tmp / EVAL_FILE, results)
            plot_perplexity(results, tmp / "perplexity.png")
    return results


def plot_perplexity(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["corpora"])
    base = [results["corpora"][n]["base_ppl"] for n in names]
    spec = [results["corpora"][n].get("specialised_ppl") for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.4))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
    if all(s is not None for s in spec):
        ax.bar([i + 0.2 for i in x], spec, width=0.4, label="specialised")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("perplexity (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict) -> str:
    """The perplexity table as markdown."""
    lines = ["| corpus | tokens | base ppl | specialised ppl | change |", "|---|---:|---:|---:|---:|"]
    for name, r in results["corpora"].items():
        spec = f"{r['specialised_ppl']:.3f}" if "specialised_ppl" in r else "-"
        change = f"{r['change_pct']:+.1f}%" if "change_pct" in r else "-"
        lines.append(f"| {name} | {r['tokens']} | {r['base_ppl']:.3f} | {spec} | {change} |")
    return "\n".join(lines)
