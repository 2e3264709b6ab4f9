"""Target domains for the quality benchmark: text a user could plausibly specialise the demo
base to, built offline from what any machine holds after ``./dev setup``.

* ``docstrings`` (the default): the demo corpus's own ``domain`` split: standard-library
  docstrings and the language-reference topics of ``pydoc_data`` (:mod:`nexus.demo.corpus`).
* ``readmes``: third-party project documentation: the long descriptions (README prose in
  Markdown or reStructuredText, with install instructions and usage examples) in the
  ``METADATA`` of every distribution installed in this environment's site-packages.
* ``c-headers``: C: CPython's own headers (``sysconfig.get_paths()["include"]``), declarations,
  macros and comments.

Why these two: the base was pretrained on standard-library Python code with its docstrings
taken out, so both are a domain shift; they also differ from each other and from the
docstrings (free-form prose about other projects vs. another programming language), so a
method that wins on one need not win on the others. ``pydoc_data``'s reference topics are not
a domain of their own: the docstrings domain already contains them.

Each source (a distribution, a header file) goes to exactly one of *train* and *held-out*, by
a hash of its name as in :mod:`nexus.demo.corpus`, at a held-out share per domain chosen so
that the held-out split holds at least 64k tokens of the demo tokenizer at sequence length 256
(``benchmarks/quality.py`` prints the counts it gets and says when a split is smaller). A domain is written as ``domain``/``domain_heldout`` (Parquet and JSONL) next
to copies of the demo corpus's ``general``/``general_heldout`` splits, in
``<cache>/demo/domain-<name>-<content hash>/``, so the benchmark reads it like the demo
corpus and the general held-out split stays the demo's.
"""

from __future__ import annotations

import email
import hashlib
import json
import os
import re
import shutil
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from pathlib import Path

from nexus.demo.corpus import (
    DOMAIN,
    DOMAIN_HELDOUT,
    GENERAL,
    GENERAL_HELDOUT,
    HELDOUT_PERMILLE,
    _rows_sha256,
    chunk,
    heldout,
    read_manifest,
    write_split,
)
from nexus.errors import NexusError

#: bump when gathering or splitting changes, so cached domains are rebuilt
DOMAINS_VERSION = 1
FORMAT = "nexus-demo-domain"
DEFAULT_DOMAIN = "docstrings"


@dataclass(frozen=True)
class Domain:
    """One target domain: where its text comes from and how much of it is held out."""

    name: str
    description: str
    #: share of sources held out, per mille
    heldout_permille: int
    #: (source name, kind, text) of every document, in a deterministic order
    documents: Callable[[], list[tuple[str, str, str]]]


def _site_packages() -> list[Path]:
    paths = sysconfig.get_paths()
    return sorted({Path(paths[k]).resolve() for k in ("purelib", "platlib") if Path(paths[k]).is_dir()})


def _own_distributions() -> set[str]:
    """This project's distribution names: its README changes with the code, so it is left out
    (the domain's content, and with it every cached result, would change with each edit)."""
    from importlib.metadata import packages_distributions

    return {_normalise(n) for n in packages_distributions().get("nexus", [])}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def readme_documents() -> list[tuple[str, str, str]]:
    """The long description of every installed distribution (one document each, by name)."""
    own, docs = _own_distributions(), {}
    for site in _site_packages():
        for meta in sorted(site.glob("*.dist-info/METADATA")):
            msg = email.message_from_bytes(meta.read_bytes(), policy=policy.compat32)
            name = _normalise(msg.get("Name") or meta.parent.name.split("-")[0])
            body = msg.get_payload()
            if not isinstance(body, str) or not body.strip():  # metadata 1.x: a folded header
                body = re.sub(r"\n {7}\|?", "\n", msg.get("Description") or "")
            if name not in own and body.strip():
                docs.setdefault(name, body.strip())
    return [(f"readmes/{name}", "readme", docs[name]) for name in sorted(docs)]


def c_header_documents() -> list[tuple[str, str, str]]:
    """CPython's C headers (one document each, by path under the include directory)."""
    root = Path(sysconfig.get_paths()["include"])
    files = sorted(root.rglob("*.h"), key=lambda p: p.relative_to(root).as_posix())
    return [
        (f"c-headers/{p.relative_to(root).as_posix()}", "c-header", p.read_text(errors="replace").strip())
        for p in files
        if p.is_file()
    ]


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in [
        # its text is the demo corpus's domain split, which ensure_domain returns as it is
        Domain(DEFAULT_DOMAIN, "standard-library docstrings and pydoc reference topics (the demo corpus)",
               HELDOUT_PERMILLE, lambda: []),
        Domain("readmes", "long descriptions (README prose) of the distributions installed in site-packages",
               200, readme_documents),
        Domain("c-headers", "CPython's C headers (sysconfig include directory)", 300, c_header_documents),
    ]
}  # fmt: skip


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise NexusError(f"unknown domain '{name}'; choose one of {', '.join(DOMAINS)}")
    return DOMAINS[name]


def split_documents(domain: Domain) -> dict[str, list[dict]]:
    """The domain's ``domain`` and ``domain_heldout`` rows (``{"text", "source", "kind"}``)."""
    splits: dict[str, list[dict]] = {DOMAIN: [], DOMAIN_HELDOUT: []}
    for source, kind, text in domain.documents():
        split = DOMAIN_HELDOUT if heldout(source, domain.heldout_permille) else DOMAIN
        splits[split] += [{"text": piece, "source": source, "kind": kind} for piece in chunk(text)]
    return splits


def ensure_domain(
    name: str, corpus_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A corpus directory for domain ``name`` whose general splits are the demo corpus's at
    ``corpus_dir`` (for ``docstrings``: ``corpus_dir`` itself); written once, keyed by content."""
    from nexus.demo import _demo_root, _lock
    from nexus.util.artifacts import atomic_dir, write_json

    domain, corpus_dir = get_domain(name), Path(corpus_dir)
    if name == DEFAULT_DOMAIN:
        return corpus_dir
    splits = split_documents(domain)
    if not splits[DOMAIN] or not splits[DOMAIN_HELDOUT]:
        raise NexusError(
            f"domain {name}: found too little text ({len(splits[DOMAIN_HELDOUT])} held-out rows)"
        )
    general_sha = read_manifest(corpus_dir)["content_sha256"]
    digest = hashlib.sha256(f"{FORMAT}/{DOMAINS_VERSION}/{name}/{domain.heldout_permille}\n".encode())
    digest.update(f"general:{general_sha}\n".encode())
    for split, rows in splits.items():
        digest.update(f"{split}:{_rows_sha256(rows)}\n".encode())
    sha = digest.hexdigest()
    root = _demo_root(cache_dir)
    out = root / f"domain-{name}-{sha[:16]}"
    if _domain_ok(out, sha):
        return out
    with _lock(root):
        if _domain_ok(out, sha):
            return out
        with atomic_dir(out, overwrite=True) as tmp:
            for split, rows in splits.items():
                write_split(tmp, split, rows)
            for split in (GENERAL, GENERAL_HELDOUT):
                _link_or_copy(corpus_dir / f"{split}.parquet", tmp / f"{split}.parquet")
            write_json(tmp / "manifest.json", _manifest(domain, sha, corpus_dir, general_sha, splits))
    return out


def _domain_ok(path: Path, sha: str) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    files = [path / f"{s}.parquet" for s in (DOMAIN, DOMAIN_HELDOUT, GENERAL, GENERAL_HELDOUT)]
    return manifest.get("content_sha256") == sha and all(f.is_file() for f in files)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the demo corpus's general splits are tens of MB), else a copy."""
    if not src.is_file():
        raise NexusError(f"{src} not found: the domain's general splits come from the demo corpus")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _manifest(domain: Domain, sha: str, corpus_dir: Path, general_sha: str, splits: dict) -> dict:
    return {
        "format": FORMAT,
        "version": DOMAINS_VERSION,
        "domain": domain.name,
        "description": domain.description,
        "content_sha256": sha,
        "heldout_fraction": domain.heldout_permille / 1000,
        "general_from": {"corpus": str(corpus_dir), "content_sha256": general_sha},
        "splits": {
            split: {
                "rows": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "sources": len({r["source"] for r in rows}),
            }
            for split, rows in splits.items()
        },
    }
