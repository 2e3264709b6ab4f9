"""Stage 6: held-out perplexity of the base and the specialised model, and sample generations.

Each named corpus (``domain``, ``general``, ...) is tokenised and packed exactly like the
training data; perplexity is exp(mean next-token NLL) over every predicted token, with the
token count reported next to it, and bits-per-byte (the same NLL in bits over the UTF-8 bytes
of the text those tokens came from, :func:`predicted_bytes`), which unlike perplexity compares
models with different tokenizers. Base and specialised numbers come from the same model
object: the specialised run loads the adapter, the base run is the same model inside
``shared_experts_disabled``, so the comparison cannot be confounded by a second load. With
``tasks``, lm-evaluation-harness scores both on downstream tasks the same way
(:mod:`nexus.stages.evaluate_tasks`).

Evaluation runs in the calling process on CPU, or, with ``gpus`` > 0 or ``memory_gb`` set, in a
Ray task with those resources (on a GPU node: ``cuda``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import ray
import torch
from pydantic import field_validator

from nexus.config import CorpusFormat, ExpertsLayout, ModelDtype, RemoteCode, Seeded, input_, setting
from nexus.data.corpus import check_corpus_files, resolve_corpus, skipped_documents
from nexus.errors import NexusError, user_errors
from nexus.method.adapter import load_adapter
from nexus.method.attach import shared_experts_disabled
from nexus.models.loading import load_config, load_model, load_tokenizer, resolve_experts
from nexus.stages.evaluate_tasks import compare_on_tasks, format_task_table, resolve_tasks, task_manager
from nexus.stages.train.core import evaluate_sums
from nexus.stages.train.data import packed_dataset
from nexus.util.artifacts import atomic_dir, claim_output, claims_released, write_json
from nexus.util.cluster import check_gpus, ensure_ray, gib
from nexus.util.preflight import check_adapter_matches, check_seq_len, check_weights

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


class EvaluateConfig(ModelDtype, ExpertsLayout, CorpusFormat, Seeded, RemoteCode):
    """``nexus evaluate``: held-out perplexity of base and specialised model, and sample generations."""

    model: str = input_(help="base model directory", identity="model")
    adapter: str | None = input_(None, help="adapter directory (none: evaluate the base only)")
    corpus: dict[str, list[str]] = input_(
        help="held-out corpora as NAME=PATH pairs, e.g. domain=held_out.jsonl general=wiki.parquet",
        identity="corpus",
    )
    output: str | None = input_(
        None, help="output directory for evaluation.json and perplexity.png (none: only print the table)"
    )
    overwrite: bool = input_(False, help="replace the output directory if it exists")
    seq_len: int = setting(256, help="tokens per packed evaluation sequence", gt=0)
    max_tokens: int = setting(65_536, help="tokens evaluated per corpus", gt=0)
    batch_size: int = setting(8, help="sequences per forward pass", gt=0)
    prompts: list[str] = setting(
        [], help="prompts for sample generations (none given: the corpus's first words)"
    )
    prompt_corpus: str = setting("domain", help="corpus the default prompts come from (if absent: the first)")
    generate_tokens: int = setting(40, help="tokens generated per prompt", ge=0)
    # -- downstream tasks (lm-evaluation-harness; nexus/stages/evaluate_tasks.py) ----------------
    tasks: list[str] = setting(
        [],
        help="lm-evaluation-harness tasks scored on base and specialised (needs the [eval] extra): names in "
        "the harness's catalogue or in --task-dir, or demo:docstrings / demo:code (the demo's own tasks)",
    )
    task_dir: str | None = setting(
        None,
        identity="task_files",
        help="directory of local task YAML files (the harness's include path; works offline)",
    )
    task_limit: int | None = setting(None, help="questions per task (none: all)", gt=0)
    task_batch_size: int = setting(8, help="the harness's batch size", gt=0)
    task_fewshot: int | None = setting(None, help="few-shot examples (none: each task's default)", ge=0)
    gpus: float = setting(0.0, help="GPUs of the Ray task that evaluates (0: this process, on CPU)", ge=0)
    cpus: float = setting(1.0, fingerprint=False, help="CPUs of the evaluation's Ray task", gt=0)
    memory_gb: float | None = setting(
        None,
        fingerprint=False,
        help="memory of the evaluation's Ray task (GiB); set: evaluate in a Ray task",
        gt=0,
    )

    @field_validator("corpus", mode="before")
    @classmethod
    def _name_path_pairs(cls, value):
        """The command line gives ``NAME=PATH`` strings; Python and the job give a mapping."""
        if isinstance(value, (list, tuple)):
            return parse_corpora([str(v) for v in value])
        return value

    @field_validator("corpus")
    @classmethod
    def _some_corpus(cls, value: dict) -> dict:
        if not value:
            raise ValueError("no evaluation corpus given; pass NAME=PATH")
        return value


@claims_released()
def run(cfg: EvaluateConfig | None = None, /, **kwargs) -> dict:
    """Perplexity per corpus for the base and (with ``cfg.adapter``) the specialised model, and
    sample generations; written to ``cfg.output`` (unless None) and returned.

    ``cfg.tasks`` adds a downstream accuracy table (lm-evaluation-harness), base and specialised
    scored with the same settings: ``task_limit`` questions per task, ``task_batch_size``,
    ``task_fewshot`` examples and ``seed`` for every harness seed.

    ``cfg.skip_bad_documents``: damaged documents of the corpora are skipped and counted in the
    results (``skipped_documents``) instead of stopping the stage; ``cfg.experts``: how the
    routed experts are held (recorded in the results as the layout used).
    """
    cfg = EvaluateConfig.build(cfg, **kwargs)
    # everything the user can get wrong is checked here, before a model is loaded anywhere
    if cfg.output is not None:
        claim_output(cfg.output, cfg.overwrite)
    config = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    experts = resolve_experts(config, cfg.experts, model=cfg.model)
    check_seq_len(config, cfg.seq_len)
    check_weights(cfg.model)
    if cfg.adapter is not None:
        check_adapter_matches(cfg.adapter, config)
    for paths in cfg.corpus.values():
        check_corpus_files(resolve_corpus(paths, cfg.corpus_format), cfg.text_field, cfg.skip_bad_documents)
    if cfg.tasks:  # an unknown task or a missing extra: before the model loads
        task_manager(*resolve_tasks(cfg.tasks, cfg.task_dir, seed=cfg.seed))
    load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    ensure_ray()
    if cfg.gpus > 0 or cfg.memory_gb:
        check_gpus(cfg.gpus, "evaluation", "use --gpus 0 (evaluate on CPU) or add GPU nodes")
        options: dict = {"num_cpus": cfg.cpus, "name": "nexus-evaluate"}
        if cfg.gpus:
            options["num_gpus"] = cfg.gpus
        if cfg.memory_gb:
            options["memory"] = gib(cfg.memory_gb)
        ref = (
            ray.remote(evaluate_model).options(**options).remote(cfg, "cuda" if cfg.gpus else "cpu", experts)
        )
        with user_errors("evaluating"):
            results = ray.get(ref)
    else:
        results = evaluate_model(cfg, "cpu", experts)
    if cfg.output is not None:
        with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
            write_json(tmp / EVAL_FILE, results)
            plot_perplexity(results, tmp / "perplexity.png")
    return results


def evaluate_model(cfg: EvaluateConfig, device: str, experts: str) -> dict:
    """The evaluation itself, on ``device``, in this process (or the Ray task :func:`run` starts),
    with the routed experts held as ``experts`` (``packed`` or ``dequantized``)."""
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    skipped = skipped_documents(cfg.skip_bad_documents)
    # the corpora are read before the model loads: a damaged document stops the stage early
    blocks = {
        name: packed_blocks(
            paths,
            cfg.model,
            cfg.seq_len,
            cfg.max_tokens,
            text_field=cfg.text_field,
            corpus_format=cfg.corpus_format,
            text_unit=cfg.text_unit,
            trust_remote_code=cfg.trust_remote_code,
            skipped=skipped,
        )
        for name, paths in cfg.corpus.items()
    }
    skip_record = skipped.finish() if skipped else None  # logs how many were skipped
    model = load_model(
        cfg.model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code, experts=experts
    )
    if cfg.adapter is not None:
        load_adapter(model, cfg.adapter)
    results: dict = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "experts": experts,
        "seq_len": cfg.seq_len,
        "corpora": {},
        **({"skipped_documents": skip_record} if skip_record is not None else {}),
    }
    for name, b in blocks.items():
        n_bytes = predicted_bytes(b, tokenizer)
        with shared_experts_disabled(model):
            nll, n = nll_sums(model, b, batch_size=cfg.batch_size, device=device)
        base_ppl = math.exp(nll / max(n, 1))
        row = {"tokens": n, "bytes": n_bytes, "base_ppl": base_ppl, "base_bpb": bits_per_byte(nll, n_bytes)}
        if cfg.adapter is not None:
            nll, _ = nll_sums(model, b, batch_size=cfg.batch_size, device=device)
            row["specialised_ppl"] = math.exp(nll / max(n, 1))
            row["specialised_bpb"] = bits_per_byte(nll, n_bytes)
            row["change_pct"] = 100.0 * (row["specialised_ppl"] / base_ppl - 1.0)
        results["corpora"][name] = row
    source = cfg.prompt_corpus if cfg.prompt_corpus in blocks else next(iter(blocks))
    prompts = cfg.prompts or default_prompts(blocks[source], tokenizer)
    with shared_experts_disabled(model):
        before = generate_samples(model, tokenizer, prompts, max_new_tokens=cfg.generate_tokens)
    results["generations"] = [{"prompt": p, "base": b} for p, b in zip(prompts, before)]
    if cfg.adapter is not None:
        after = generate_samples(model, tokenizer, prompts, max_new_tokens=cfg.generate_tokens)
        for row, text in zip(results["generations"], after):
            row["specialised"] = text
    if cfg.tasks:
        names, dirs = resolve_tasks(cfg.tasks, cfg.task_dir, seed=cfg.seed)
        results["tasks"] = compare_on_tasks(
            model,
            tokenizer,
            names,
            specialised=cfg.adapter is not None,
            task_dir=dirs,
            limit=cfg.task_limit,
            batch_size=cfg.task_batch_size,
            num_fewshot=cfg.task_fewshot,
            seed=cfg.seed,
        )
    return results


def packed_blocks(
    paths: list[str],
    model_dir: str,
    seq_len: int,
    max_tokens: int | None = None,
    *,
    text_field: str = "text",
    corpus_format: str = "auto",
    text_unit: str = "line",
    trust_remote_code: bool = False,
    skipped=None,
) -> torch.Tensor:
    """Packed ``[N, seq_len]`` int64 blocks exactly as ``nexus train`` builds them (Ray Data),
    the first ``max_tokens`` worth (at least one block) or all of them. ``skipped``: a
    :class:`nexus.data.corpus.SkippedDocuments` to skip damaged documents into."""
    ds = packed_dataset(
        [str(p) for p in paths],
        str(model_dir),
        seq_len=seq_len,
        text_field=text_field,
        corpus_format=corpus_format,
        text_unit=text_unit,
        trust_remote_code=trust_remote_code,
        skipped=skipped,
    )
    if max_tokens is not None:
        ds = ds.limit(max(1, max_tokens // seq_len))
    rows = ds.take_all()
    return torch.stack([torch.from_numpy(np.array(r["input_ids"], dtype=np.int64)) for r in rows])


def nll_sums(model, blocks: torch.Tensor, *, batch_size: int = 8, device="cpu") -> tuple[float, int]:
    """(summed next-token NLL in nats, predicted tokens) of ``model`` on packed ``blocks`` [N, S]."""
    batches = [blocks[i : i + batch_size].to(device) for i in range(0, len(blocks), batch_size)]
    return evaluate_sums(model, batches)


def perplexity(model, blocks: torch.Tensor, *, batch_size: int = 8, device="cpu") -> tuple[float, int]:
    """(perplexity, predicted tokens) of ``model`` on packed ``blocks`` [N, S]."""
    nll, n = nll_sums(model, blocks, batch_size=batch_size, device=device)
    return math.exp(nll / max(n, 1)), n


def predicted_bytes(blocks: torch.Tensor, tokenizer) -> int:
    """UTF-8 bytes of the text whose tokens a perplexity over ``blocks`` predicts.

    Every token of a block but the first is predicted, so the count covers ``block[1:]`` of
    each block. Packing does not keep byte offsets, so the tokens are decoded: each block's
    predicted tokens are cut at the end-of-text separators that packing puts between
    documents, and each run between them is decoded as a whole (no clean-up of spaces) and
    measured in UTF-8. A separator counts as **one byte**: it stands for a document
    boundary, which a byte-level model would also have to predict as one separator byte, and
    every tokenizer puts exactly one between two documents, so the count stays comparable
    across tokenizers. Other special tokens (a BOS a tokenizer adds per document) count zero.
    Decoding is exact for whole characters, hence for ASCII text. The approximation is at a
    block's two ends, where a byte-level tokenizer may have split a multi-byte character: the
    bytes of it that fall in the predicted part decode to U+FFFD (3 bytes each continuation
    byte at the start, 3 bytes for an incomplete character at the end), so such a block is
    over-counted by at most 8 bytes (in a typical block of thousands of bytes).
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    total = 0
    for block in blocks.tolist():
        run: list[int] = []
        for tok in [*block[1:], None]:
            if tok is None or tok == sep:
                if run:
                    text = tokenizer.decode(run, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                    total += len(text.encode("utf-8"))
                run = []
                total += tok is not None
            else:
                run.append(tok)
    return total


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Summed NLL in nats over ``n_bytes`` bytes, as bits per byte."""
    return nll / (math.log(2) * max(n_bytes, 1))


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
    """The perplexity table as markdown (with bits-per-byte where measured)."""
    lines = [
        "| corpus | tokens | bytes | base ppl | specialised ppl | change | base bpb | specialised bpb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["corpora"].items():
        spec = f"{r['specialised_ppl']:.3f}" if "specialised_ppl" in r else "-"
        change = f"{r['change_pct']:+.1f}%" if "change_pct" in r else "-"
        bpb = [f"{r[k]:.4f}" if k in r else "-" for k in ("base_bpb", "specialised_bpb")]
        row = [name, r["tokens"], r.get("bytes", "-"), f"{r['base_ppl']:.3f}", spec, change, *bpb]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def format_tables(results: dict) -> str:
    """The perplexity table and, when tasks were run, the downstream accuracy table."""
    if not results.get("tasks"):
        return format_table(results)
    return format_table(results) + "\n\n" + format_task_table(results["tasks"])


def summary_lines(results: dict, cfg: EvaluateConfig) -> list[str]:
    return format_tables(results).splitlines()


def job_inputs(job) -> dict:
    """In the job: the trained adapter and every held-out corpus of ``data.eval``."""
    return {"model": job.model_dir, "adapter": job.stage_dir("train", "adapter"), "corpus": job.eval_corpora}
