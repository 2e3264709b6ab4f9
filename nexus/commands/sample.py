"""``nexus sample``: pick a calibration subset that covers the corpus's vocabulary."""

from __future__ import annotations

from nexus.commands.common import positive_int

ORDER = 10


def add_corpus_args(p) -> None:
    p.add_argument(
        "--corpus",
        required=True,
        nargs="+",
        metavar="PATH",
        help="text/JSONL/Parquet files, directories, globs or URIs (s3://, gs://, ...)",
    )
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument(
        "--corpus-format",
        choices=("auto", "text", "jsonl", "parquet"),
        default="auto",
        help="file format (default: by extension)",
    )
    p.add_argument(
        "--text-unit",
        choices=("line", "paragraph", "file"),
        default="line",
        help="how plain-text files split into documents (default: one per line)",
    )
    add_skip_arg(p)


def add_skip_arg(p) -> None:
    p.add_argument(
        "--skip-bad-documents",
        action="store_true",
        help="skip damaged documents (invalid JSON or UTF-8, a missing or non-text field, a damaged Parquet "
        "row group, the unreadable end of a cut-short file), count and report them, instead of stopping",
    )


def register(sub) -> None:
    from nexus.sampling import METHODS, WEIGHTINGS

    p = sub.add_parser(
        "sample",
        help="choose a calibration subset covering the vocabulary (lazy greedy / GreeDi on Ray Data)",
        description="Greedy maximum coverage of distinct tokens under a token budget. Writes "
        "OUTPUT/sample.parquet (text, num_tokens) and OUTPUT/sample.json (coverage report against a "
        "random sample of the same size). `nexus collect --corpus OUTPUT` reads the sample.",
    )
    p.add_argument("--model", required=True, help="model directory whose tokenizer defines the tokens")
    add_corpus_args(p)
    p.add_argument("--target-tokens", type=positive_int, required=True, help="token budget of the sample")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="greedi",
        help="greedi: two-round distributed lazy greedy on Ray (default); greedy: single-machine lazy "
        "greedy; random: a random sample",
    )
    p.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="token weights (idf: rare up)")
    p.add_argument(
        "--max-doc-tokens", type=positive_int, default=2048, help="document-length cap (default 2048)"
    )
    p.add_argument(
        "--shard-docs", type=positive_int, default=20_000, help="documents per first-round shard (greedi)"
    )
    p.add_argument("--no-fill", action="store_true", help="do not fill the budget once coverage saturates")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order (fill and baseline)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom tokenizer code from the model"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.sampling import sample

    report = sample(
        args.corpus,
        args.model,
        args.output,
        args.target_tokens,
        text_field=args.text_field,
        file_format=args.corpus_format,
        text_unit=args.text_unit,
        max_doc_tokens=args.max_doc_tokens,
        method=args.method,
        weighting=args.weighting,
        shard_docs=args.shard_docs,
        fill=not args.no_fill,
        seed=args.seed,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        skip_bad_documents=args.skip_bad_documents,
    )
    s, r = report["sample"], report["random"]
    print(f"{'':<8} {'docs':>8} {'tokens':>10} {'distinct':>9} {'coverage':>9} {'KL(pool)':>9}")
    for name, d in (("sample", s), ("random", r)):
        print(
            f"{name:<8} {d['docs']:>8} {d['tokens']:>10} {d['distinct_tokens']:>9} "
            f"{100 * d['coverage']:>8.1f}% {d['kl_to_pool']:>9.4f}"
        )
    print(
        f"pool: {report['pool']['docs']} docs, {report['pool']['tokens']} tokens, "
        f"{report['pool']['distinct_tokens']} distinct; wrote {args.output}"
    )
    return 0
