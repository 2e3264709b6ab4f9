"""``nexus demo-model``: pretrain the small GPT-OSS-architecture demo base model on CPU."""

from __future__ import annotations

from nexus.commands.common import add_output_args, non_negative_int

ORDER = 51


def register(sub) -> None:
    p = sub.add_parser(
        "demo-model",
        help="pretrain the demo MoE base model (GPT-OSS architecture) on the demo corpus, on CPU",
        description="Train a byte-level BPE tokenizer and a small GptOssForCausalLM from scratch on the general "
        "split of the demo corpus, evaluate it on the held-out splits, and save a Hugging Face model "
        "directory with demo_metadata.json. Deterministic for a given seed.",
    )
    p.add_argument(
        "--size",
        choices=["tiny", "small"],
        default="small",
        help="tiny (tests, seconds) or small (default, minutes)",
    )
    add_output_args(p)
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--corpus",
        help="a directory written by 'nexus demo-corpus' (default: gather the standard library now)",
    )
    p.add_argument(
        "--mxfp4",
        action="store_true",
        help="store the experts in MXFP4 exactly as the published GPT-OSS checkpoints do "
        "(the same trained base, quantised; collect, train and evaluate keep them packed)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.demo.pretrain import build_demo_model, read_metadata, summary_lines

    out = build_demo_model(
        args.output,
        size=args.size,
        seed=args.seed,
        corpus=args.corpus,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        format="mxfp4" if args.mxfp4 else "float32",
    )
    metadata = read_metadata(out)
    print(f"demo model written to {out}")
    for line in summary_lines(metadata):
        print(f"  {line}")
    if args.size == "small":
        failed = [k for k, v in metadata["bars"].items() if v is False]
        print("  quality bars: " + ("all met" if not failed else "NOT met: " + ", ".join(failed)))
    return 0
