"""``nexus export``: merge an adapter into the family's native shared expert (stock checkpoint)."""

from __future__ import annotations

from nexus.commands.common import add_output_args

ORDER = 80


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a stock checkpoint with the adapter merged into the native shared expert (DeepSeek-V2/V3, GLM4-MoE, ERNIE-4.5-MoE)",
    )
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.stages.export import merge_adapter

    out = merge_adapter(
        args.model,
        args.adapter,
        args.output,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"merged checkpoint: {out} (loads with AutoModelForCausalLM.from_pretrained, no nexus needed)")
    return 0
