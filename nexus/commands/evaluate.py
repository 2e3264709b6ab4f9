"""``nexus evaluate``: held-out perplexity of base vs specialised, and sample generations."""

from __future__ import annotations

from nexus.commands.common import add_experts_arg, add_output_args, positive_int
from nexus.commands.sample import add_skip_arg

ORDER = 70


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="perplexity of the base and the specialised model on held-out text")
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", help="adapter directory (omit to evaluate the base only)")
    p.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        help="NAME=PATH pairs, e.g. domain=held_out.jsonl general=wiki.parquet",
    )
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--max-tokens", type=positive_int, default=65536, help="tokens evaluated per corpus")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--text-field", default="text")
    add_skip_arg(p)
    p.add_argument("--prompt", action="append", help="prompt for sample generations (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    add_experts_arg(p)
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.evaluate import evaluate, format_table, parse_corpora

    results = evaluate(
        args.model,
        args.adapter,
        parse_corpora(args.corpus),
        args.output,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        text_field=args.text_field,
        prompts=args.prompt,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        skip_bad_documents=args.skip_bad_documents,
        experts=args.experts,
    )
    print(format_table(results))
    return 0
