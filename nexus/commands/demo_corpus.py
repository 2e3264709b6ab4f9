"""``nexus demo-corpus``: write the built-in demo corpus (text from Python's standard library)."""

from __future__ import annotations

from nexus.commands.common import add_output_args

ORDER = 50


def register(sub) -> None:
    p = sub.add_parser(
        "demo-corpus",
        help="write the built-in demo corpus (general/domain splits from the standard library)",
        description="Gather the standard library's code (general) and documentation prose (domain), split "
        "into training and held-out parts, and write JSONL and Parquet files with a 'text' column.",
    )
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.demo.corpus import gather_corpus, write_corpus
    from nexus.util.artifacts import check_output_dir

    check_output_dir(args.output, args.overwrite)  # before the work, not after
    corpus = gather_corpus()
    write_corpus(corpus, args.output, overwrite=args.overwrite)
    manifest = corpus.manifest()
    print(
        f"demo corpus written to {args.output} (content sha256 {corpus.sha256[:16]}, Python {corpus.python})"
    )
    for name, split in manifest["splits"].items():
        print(
            f"  {name:<16} {split['rows']:>6} rows  {split['characters']:>10,} characters  {split['sources']:>4} sources"
        )
    return 0
