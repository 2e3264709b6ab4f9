"""Security (docs/security.md): no pickle is ever loaded and custom model code stays off
unless asked for. The cluster configs' checks live in tests/test_cluster.py."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".venv", "venv", ".git", "__pycache__", "build", "dist", "runs", ".nexus_cache", "node_modules"}

#: module -> functions that unpickle (called as ``module.fn`` or imported by name)
UNPICKLERS = {
    "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads", "Unpickler"},
    "cloudpickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "joblib": {"load"},
    "shelve": {"open"},
    "pandas": {"read_pickle"},
    "pd": {"read_pickle"},
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Places in ``source`` that load pickles or hard-code trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module:
            names = UNPICKLERS.get(node.module.split(".")[0], set())
            for alias in node.names:
                if alias.name in names:
                    found.append(f"{where}: from {node.module} import {alias.name}")
                if node.module.split(".")[0] == "torch" and alias.name == "load":
                    found.append(f"{where}: from torch import load (use torch.load(..., weights_only=True))")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] in UNPICKLERS.get(parts[-2], set()):
            found.append(f"{where}: {name}(...)")
        if name.endswith("torch.load") and not _is_true(keywords.get("weights_only")):
            found.append(f"{where}: {name}(...) without weights_only=True")
        if _is_true(keywords.get("allow_pickle")):
            found.append(f"{where}: {name}(..., allow_pickle=True)")
        if _is_true(keywords.get("trust_remote_code")):
            found.append(f"{where}: {name}(..., trust_remote_code=True) hard-coded")
    return found


def python_files() -> list[Path]:
    """The repository's Python files: tracked and untracked-but-not-ignored (git), else a walk."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return sorted({ROOT / p for p in out if (ROOT / p).is_file()})
    return sorted(p for p in ROOT.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(ROOT).parts))


def test_the_scanner_finds_what_it_looks_for():
    bad = """
import pickle, torch, numpy as np
from pickle import loads
from transformers import AutoModel
a = pickle.load(open("x", "rb"))
b = torch.load("x.pt")
c = torch.load("x.pt", weights_only=False)
d = np.load("x.npy", allow_pickle=True)
e = AutoModel.from_pretrained("m", trust_remote_code=True)
f = pd.read_pickle("x.pkl")
"""
    found = unsafe_calls(bad)
    assert len(found) == 7, found
    good = """
import torch, numpy as np
a = torch.load("x.pt", weights_only=True)
b = np.load("x.npy")
c = load_model("m", trust_remote_code=args.trust_remote_code)
d = json.loads(text)
"""
    assert unsafe_calls(good) == []


def test_no_pickle_is_loaded_and_no_remote_code_is_hard_coded():
    files = python_files()
    assert ROOT / "nexus" / "models" / "loading.py" in files and len(files) > 50
    found = [hit for f in files for hit in unsafe_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "unsafe loads:\n" + "\n".join(found)


def test_trust_remote_code_is_off_unless_asked_for():
    from nexus.cli import COMMANDS, build_parser
    from nexus.job.config import parse_config
    from nexus.models.loading import load_config, load_model, load_tokenizer

    for fn in (load_config, load_model, load_tokenizer):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn
    assert parse_config({}).model.trust_remote_code is False
    with_flag = []
    for name in COMMANDS:
        sub = build_parser(name)._subparsers._group_actions[0].choices[name]  # noqa: SLF001
        config = sub.get_default("_config")
        if "--trust-remote-code" in sub._option_string_actions:  # noqa: SLF001
            with_flag.append(name)
            assert config.model_fields["trust_remote_code"].default is False, name
    assert {"collect", "sample", "convert", "train", "evaluate", "export", "info", "analyze"} <= set(
        with_flag
    )


def test_model_weights_are_only_read_from_safetensors():
    from nexus.models import loading

    source = inspect.getsource(loading.load_model)
    assert "use_safetensors=True" in source


# The cluster configs (dashboard and job API on private addresses, token auth on) are checked
# by tests/test_cluster.py, next to the rest of their tests.
