"""``nexus plan``: predicted peak memory of collect, train and evaluate per worker, and whether it fits.

Reads only ``config.json`` (the model is built on the meta device), so it answers in seconds
for any size, before a GPU is rented or a weight downloaded. Exit status: 0 when every stage
fits (or the device memory is unknown), 1 when one does not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json

from nexus.commands.common import positive_int

ORDER = 3


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict each stage's peak memory per worker from config.json, and whether it fits",
        description="Predict the peak memory of collect, train and evaluate per worker (frozen weights, "
        "shared experts, gradients, AdamW state, activations, loss chunks) from the model's config.json "
        "alone, and say whether it fits the given GPUs or CPU nodes and which setting to change if not.",
    )
    p.add_argument("--model", help="model directory (only config.json is read) or Hub name")
    p.add_argument("--config", help="job YAML: every stage's settings and where it runs")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="job override",
    )
    p.add_argument(
        "--gpus", type=positive_int, help="GPUs in the cluster (without --config: every stage on GPUs)"
    )
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GB, 141GB, 79GiB")
    p.add_argument("--cpu-memory", help="memory of one CPU node, e.g. 512GB (default: this machine's)")
    p.add_argument("--cpu-nodes", type=positive_int, default=1, help="CPU nodes that CPU workers spread over")
    p.add_argument("--batch-size", type=positive_int, help="sequences per batch (collect, train, evaluate)")
    p.add_argument("--seq-len", type=positive_int, help="tokens per sequence (collect, train, evaluate)")
    p.add_argument("--workers", type=positive_int, help="collectors and training workers")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--intermediate-size", type=positive_int, help="shared-expert width (convert)")
    p.add_argument("--dtype", help="weights' dtype: float32, bfloat16, float16 or auto")
    p.add_argument(
        "--experts", choices=("auto", "packed", "dequantized"), help="routed experts of MXFP4 models"
    )
    p.add_argument("--kd-weight", type=float, help="distillation weight (0: no teacher forward)")
    p.add_argument("--loss-chunk", type=positive_int, help="positions per chunk of the vocabulary loss")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step")
    p.add_argument("--strategy", default="ddp", choices=("ddp",), help="training strategy")
    p.add_argument("--stage", nargs="+", default=None, choices=("collect", "train", "evaluate"))
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the stacked parts per stage")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.planner import STAGES, plan, plot_plan

    settings = {
        k: getattr(args, k)
        for k in (
            "batch_size",
            "seq_len",
            "workers",
            "gradient_checkpointing",
            "intermediate_size",
            "dtype",
            "experts",
            "kd_weight",
            "loss_chunk",
            "grad_accum",
        )
    }
    overrides = list(args.overrides) + (["model.trust_remote_code=true"] if args.trust_remote_code else [])
    result = plan(
        args.model,
        config=args.config,
        overrides=overrides,
        gpus=args.gpus,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
        cpu_nodes=args.cpu_nodes,
        strategy=args.strategy,
        stages=tuple(args.stage or STAGES),
        **settings,
    )
    print(
        json.dumps(result.to_dict(), indent=2) if args.json else result.table(),
        end="" if not args.json else "\n",
    )
    if args.plot:
        plot_plan(result, args.plot)
    return 1 if result.fits is False else 0
