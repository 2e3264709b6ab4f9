"""``nexus families``: the supported MoE families and what NEXUS does with each."""

from __future__ import annotations

ORDER = 2


def register(sub) -> None:
    p = sub.add_parser("families", help="list supported MoE families")
    p.set_defaults(func=run)


def run(args) -> int:
    from nexus.families import FAMILIES
    from nexus.serving.vllm_plugin import ARCHITECTURES

    print(f"{'family':<16} {'router':<8} {'native shared expert':<22} export")
    for f in FAMILIES.values():
        native = f.native_shared or "-"
        if f.native_shared_gate:
            native += " (gated)"
        export = (
            "adapter"
            + (" + vLLM" if f.name in ARCHITECTURES else "")
            + (" + native merge" if f.mergeable else "")
        )
        print(f"{f.name:<16} {f.probs:<8} {native:<22} {export}")
    return 0
