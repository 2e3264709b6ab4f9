"""``nexus convert``: build the initial adapter from the checkpoint, one Ray task per layer."""

from __future__ import annotations

from nexus.commands.common import positive_int

ORDER = 40


def register(sub) -> None:
    from nexus.method.shared_expert import GATES
    from nexus.stages.convert import DTYPES, INITS, WEIGHTINGS

    p = sub.add_parser(
        "convert",
        help="average the selected experts into initial shared-expert weights (an adapter)",
        description="Reads only the selected experts' slices from the model's safetensors files (MXFP4 decoded), "
        "one Ray task per layer, and writes an adapter directory loadable with nexus.load_adapter.",
    )
    p.add_argument("--model", required=True, help="base model directory (config.json + safetensors)")
    p.add_argument(
        "--selection", default=None, help="output of nexus analyze (needed for pca/frequency/gate)"
    )
    p.add_argument("--output", required=True, help="adapter directory to write (atomically)")
    p.add_argument(
        "--init",
        choices=INITS,
        default="pca",
        help="pca: average the analysis' selected experts; frequency/gate: average the experts ranked by that "
        "ESFT score; zero: start exactly at the base model; random",
    )
    p.add_argument(
        "--weighting", choices=WEIGHTINGS, default="uniform", help="how selected experts are averaged"
    )
    p.add_argument(
        "--intermediate-size",
        type=positive_int,
        default=None,
        help="shared-expert width (default: the experts'; another width only with --init zero or random)",
    )
    p.add_argument("--gate", choices=GATES, default="scalar", help="output gate of the shared expert")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="initial output scale (the scalar gate's value; folded into the down projection otherwise)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the adapter tensors")
    p.add_argument("--seed", type=int, default=0, help="seed for random initial weights")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.stages.convert import convert

    out = convert(
        args.model,
        args.output,
        args.selection,
        init=args.init,
        weighting=args.weighting,
        intermediate_size=args.intermediate_size,
        gate=args.gate,
        scale=args.scale,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"adapter written to {out}")
    return 0
