"""The README's commands and job snippets are accepted by the code that runs them.

A new user copies these lines first; a renamed flag or key must fail here, not in their shell.
Every ``nexus ...`` line of the README's code blocks (with its ``\\`` continuations) is parsed by
``nexus``'s own parser and turned into its stage config (bounds and choices checked). Nothing
runs. (The job configs in ``jobs/configs/`` are loaded by tests/test_job.py.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang: str | None = None) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [
        body for tag, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang is None or tag == lang
    ]


def _commands() -> list[str]:
    lines = []
    for block in _blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("nexus ") and "..." not in line:
                lines.append(line)
    return lines


def test_the_readme_shows_commands():
    assert len(_commands()) >= 10


@pytest.mark.parametrize("line", _commands())
def test_every_readme_command_parses_into_its_config(line):
    from nexus.cli import COMMANDS, build_parser, config_from_args

    argv = shlex.split(line, comments=True)[1:]
    command = argv[0]
    assert command in COMMANDS, f"README uses an unknown command: {line}"
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    assert not extra, f"README passes unknown flags {extra}: {line}"
    config_from_args(args._parser, args._config, args)
