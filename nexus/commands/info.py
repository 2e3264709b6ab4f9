"""``nexus info``: what NEXUS sees in a model (family, MoE layers, experts, shared-expert size)."""

from __future__ import annotations

import json

from nexus.commands.common import add_model_args

ORDER = 1


def register(sub) -> None:
    p = sub.add_parser("info", help="show the MoE structure NEXUS finds in a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.models.identity import model_identity
    from nexus.models.loading import load_config

    ident = model_identity(load_config(args.model, trust_remote_code=args.trust_remote_code))
    if args.json:
        print(json.dumps(ident, indent=2))
    else:
        for key, value in ident.items():
            print(f"{key:>18}: {value}")
    return 0
