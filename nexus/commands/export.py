"""``nexus export``: a directory ``vllm serve`` runs (``--format vllm``), or the adapter merged
into the family's native shared expert (``--format merged``, a stock checkpoint)."""

from __future__ import annotations

from nexus.commands.common import add_output_args

ORDER = 80

_DONE = {
    "vllm": "vLLM model directory: {out} (serve it with: vllm serve {out}, NEXUS installed beside vLLM)",
    "merged": "merged checkpoint: {out} (loads with AutoModelForCausalLM.from_pretrained, no nexus needed)",
}


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a vLLM model directory (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE) or a stock checkpoint with the "
        "adapter merged into the native shared expert (DeepSeek-V2/V3, GLM4-MoE, ERNIE-4.5-MoE)",
    )
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument(
        "--format",
        required=True,
        choices=sorted(_DONE),
        help="vllm: base weights linked + adapter, for `vllm serve`; merged: native merge",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    add_output_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.serving.export import export_adapter

    out = export_adapter(
        args.model,
        args.adapter,
        args.output,
        format=args.format,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(_DONE[args.format].format(out=out))
    return 0
