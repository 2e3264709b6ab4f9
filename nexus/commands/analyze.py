"""``nexus analyze``: per-layer PCA of router statistics, expert importance and selection."""

from __future__ import annotations

from nexus.commands.common import positive_int

ORDER = 30


def _fraction(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def register(sub) -> None:
    from nexus.stages.analyze import DEFAULT_COMPONENTS, DEFAULT_TOP_K, IMPORTANCES

    p = sub.add_parser(
        "analyze",
        help="select important experts per layer from router statistics (PCA, ESFT scores)",
        description="Per MoE layer (one Ray task each): PCA of the router probabilities from the collected "
        "covariance, expert importance, and the selection written to OUTPUT/selection.json.",
    )
    p.add_argument("--stats", required=True, help="router statistics directory (output of nexus collect)")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help=f"experts selected per layer (default {DEFAULT_TOP_K}, capped at the expert count)",
    )
    p.add_argument(
        "--importance",
        choices=IMPORTANCES,
        default="pca",
        help="pca: sum of |loading| x explained-variance ratio over the first components (reference); "
        "variance: sum of eigenvalue x loading^2; frequency: share of tokens routed (ESFT-Token); "
        "gate: mean routing weight (ESFT-Gate)",
    )
    p.add_argument(
        "--threshold",
        type=_fraction,
        default=None,
        help="instead of top-k: the smallest set of experts covering this share of the layer's importance",
    )
    p.add_argument(
        "--components",
        type=positive_int,
        default=DEFAULT_COMPONENTS,
        help=f"principal components used by the pca/variance importances (default {DEFAULT_COMPONENTS})",
    )
    p.add_argument("--plots", action="store_true", help="also write PNG plots into OUTPUT/plots")
    p.add_argument("--model", default=None, help="optional: check the statistics belong to this model")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code (with --model)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.stages.analyze import analyze, summary_lines

    selection = analyze(
        args.stats,
        args.output,
        top_k=args.top_k,
        importance=args.importance,
        threshold=args.threshold,
        components=args.components,
        plots=args.plots,
        overwrite=args.overwrite,
        model=args.model,
        trust_remote_code=args.trust_remote_code,
    )
    for line in summary_lines(selection):
        print(line)
    print(f"selection written to {args.output}")
    return 0
