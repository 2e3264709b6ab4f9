"""``nexus collect``: router statistics of a model on a corpus, with Ray Data actors."""

from __future__ import annotations

from nexus.commands.common import add_experts_arg, non_negative_int, positive_int
from nexus.commands.sample import add_corpus_args

ORDER = 20


def _non_negative_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {value}")
    return value


def register(sub) -> None:
    from nexus.collect import DEFAULT_BATCH_SIZE, DEFAULT_SEQ_LEN

    p = sub.add_parser(
        "collect",
        help="collect per-layer router statistics of a model on a corpus (Ray Data actors)",
        description="Run the frozen model over the corpus and store, per MoE layer, sufficient statistics "
        "of the router probabilities (token count, sum p, sum p p^T, top-k counts and weights, entropy) in "
        "OUTPUT/router_stats.safetensors + OUTPUT/router_stats.json.",
    )
    p.add_argument("--model", required=True, help="base model directory (readable on every worker node)")
    add_corpus_args(p)
    p.add_argument(
        "--target-tokens",
        type=positive_int,
        default=None,
        help="tokens to collect (default: the whole corpus; fewer available: a warning and all of them)",
    )
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--workers", type=positive_int, default=1, help="collector actors, one model each")
    p.add_argument("--gpus-per-worker", type=_non_negative_float, default=0.0, help="GPUs per actor (0: CPU)")
    p.add_argument(
        "--cpus-per-worker",
        type=_non_negative_float,
        default=None,
        help="CPU threads per actor (default: the cluster's CPUs split evenly; 1 with GPUs)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="sequences per forward pass"
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=DEFAULT_SEQ_LEN,
        help=f"longest sequence; longer documents are cut into pieces (default {DEFAULT_SEQ_LEN})",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    add_experts_arg(p)
    p.add_argument(
        "--reservoir",
        type=non_negative_int,
        default=0,
        help="also keep raw router probabilities of this many uniformly sampled tokens (for plots)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the reservoir sample")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.collect import collect

    stats = collect(
        args.model,
        args.corpus,
        args.output,
        args.target_tokens,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        experts=args.experts,
        text_field=args.text_field,
        file_format=args.corpus_format,
        text_unit=args.text_unit,
        reservoir=args.reservoir,
        seed=args.seed,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        skip_bad_documents=args.skip_bad_documents,
    )
    m = stats.meta
    print(
        f"collected {stats.tokens} tokens, {len(stats.layers)} MoE layers x {stats.num_experts} experts "
        f"(top-{m['top_k']}) in {m['elapsed_s']:.1f}s ({m['tokens_per_s']:.0f} tokens/s); wrote {args.output}"
    )
    for pos, layer in enumerate(stats.layers):
        freq = stats.frequency(pos)
        print(
            f"  layer {layer:>3}: entropy {stats.mean_entropy(pos):.3f} nats, "
            f"busiest expert {int(freq.argmax())} ({100 * freq.max() / max(freq.sum(), 1e-12):.1f}% of selections)"
        )
    return 0
