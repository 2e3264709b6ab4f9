"""One config per stage: its CLI flags, its job YAML section and its Python keywords agree in
name, default and bounds, because all three are derived from it; one CLI (the job is
``nexus specialize``); ``nexus --help`` stays light."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from nexus.cli import build_parser, config_from_args
from nexus.config import INPUT, SETTING, SHARED, meta, optional
from nexus.errors import NexusError
from nexus.job.config import SECTIONS, parse_config, shared_values
from nexus.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _example(annotation):
    """A value of type ``annotation`` (for required inputs)."""
    inner, _ = optional(annotation)
    if get_origin(inner) in (typing.Union, __import__("types").UnionType):
        inner = get_args(inner)[0]
    if get_origin(inner) is list:
        return ["a.jsonl", "b.jsonl"]
    if get_origin(inner) is dict:
        return {"domain": ["held.jsonl"]}
    return "x"


def _other(field):
    """A valid value of the field other than its default."""
    inner, nullable = optional(field.annotation)
    default = field.get_default(call_default_factory=True)
    if inner is bool:
        return not default
    if get_origin(inner) is Literal:
        return next(c for c in get_args(inner) if c != default)
    if get_origin(inner) is list:
        (element,) = get_args(inner)
        # a list of choices (train.report_to) takes some of them
        return list(get_args(element)[:2]) if get_origin(element) is Literal else ["p", "q"]
    if inner is int:
        return 5 if default is None else default + 1
    if inner is float:
        return 0.5 if default is None else default + 0.25
    return "other"


def _argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            argv += [flag, *(f"{k}={p}" for k, paths in value.items() for p in paths)]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, "none" if value is None else str(value)]
    return argv


def _violation(field):
    """A value just outside the field's bounds, if it has any."""
    for m in field.metadata:
        for attr, bad in (
            ("gt", lambda b: b),
            ("ge", lambda b: b - 1),
            ("le", lambda b: b + 0.5),
            ("lt", lambda b: b),
        ):
            bound = getattr(m, attr, None)
            if bound is not None:
                return bad(bound)
    return None


class Three:
    """One stage's config built the three ways a user can build it."""

    def __init__(self, spec) -> None:
        self.spec, self.config = spec, spec.config
        self.inputs = {
            n: _example(f.annotation) for n, f in self.config.fields(INPUT).items() if f.is_required()
        }

    def cli(self, **values):
        parser = build_parser(self.spec.name)
        args = parser.parse_args([self.spec.name, *_argv({**self.inputs, **values})])
        return config_from_args(args._parser, args._config, args)

    def python(self, **values):
        return self.config.build(**self.inputs, **values)

    def job(self, **values):
        """As the job builds it: the stage's YAML section, the shared settings where they live."""
        data: dict = {self.spec.name: {}}
        for name, value in values.items():
            home = meta(self.config.model_fields[name]).get("home")
            if home is None:
                data[self.spec.name][name] = value
            else:
                (data.setdefault(home, {}) if home else data)[name] = value
        job = parse_config(data)
        section = getattr(job, self.spec.name).model_dump(exclude={"enabled"})
        return self.config.build(**section, **shared_values(job, self.config), **self.inputs)


def _outcome(build, **values):
    """The config built, or "rejected" (a CLI error exits, Python and the job raise NexusError)."""
    try:
        return build(**values).model_dump()
    except (NexusError, SystemExit):
        return "rejected"


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_flags_yaml_keys_and_keywords_are_one_set_of_names(spec):
    config = spec.config
    sub = build_parser(spec.name)._subparsers._group_actions[0].choices[spec.name]  # noqa: SLF001
    flags = {a.dest for a in sub._actions if a.option_strings and a.dest not in ("help", "debug")}  # noqa: SLF001
    assert flags == set(config.model_fields)  # every field is a flag, and nothing else is
    # `enabled`, unless a setting switches the stage on (export.format, train.kd for distill)
    enabled = {"enabled"} if spec.switch is None and spec.enabled_by is None else set()
    assert set(SECTIONS[spec.name].model_fields) == set(config.fields(SETTING)) | enabled
    job = parse_config({})
    for name, field in config.fields(SHARED).items():  # shared ones live once, at their home
        home = meta(field)["home"]
        assert getattr(getattr(job, home) if home else job, name) == field.default, name
    assert not set(config.fields(INPUT)) & set(SECTIONS[spec.name].model_fields)
    # one Python style for every stage: run(cfg) or run(**keywords), the keywords being the fields
    params = list(inspect.signature(spec.module.run).parameters.values())
    assert [(p.name, p.kind) for p in params] == [
        ("cfg", inspect.Parameter.POSITIONAL_ONLY),
        ("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
    assert callable(spec.module.summary_lines) and callable(spec.module.job_inputs)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_defaults_and_values_agree_three_ways(spec):
    three = Three(spec)
    assert three.cli() == three.python() == three.job()  # the defaults
    for name, field in spec.config.fields(SETTING, SHARED).items():
        value = _other(field)
        outcomes = {how: _outcome(getattr(three, how), **{name: value}) for how in ("cli", "python", "job")}
        assert len({repr(o) for o in outcomes.values()}) == 1, (name, value, outcomes)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_bounds_are_checked_once_and_alike(spec):
    three = Three(spec)
    checked = 0
    for name, field in spec.config.fields(SETTING, SHARED).items():
        bad = _violation(field)
        if bad is None:
            continue
        checked += 1
        for how in ("cli", "python", "job"):
            assert _outcome(getattr(three, how), **{name: bad}) == "rejected", (name, how)
    assert checked or spec.name in ("export",)


def test_a_bound_names_the_flag_the_key_or_the_keyword(capsys):
    three = Three(next(s for s in STAGES if s.name == "collect"))
    with pytest.raises(SystemExit):
        three.cli(batch_size=0)
    assert (
        "nexus collect: error: argument --batch-size: Input should be greater than 0 (got 0)"
        in capsys.readouterr().err
    )
    with pytest.raises(
        NexusError, match=r"collect setting 'batch_size': Input should be greater than 0 \(got 0\)"
    ):
        three.python(batch_size=0)
    with pytest.raises(NexusError, match=r"config key 'collect.batch_size': Input should be greater than 0"):
        three.job(batch_size=0)


def _run(argv: list[str], code: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_nexus_help_imports_neither_torch_nor_ray_nor_transformers():
    code = (
        "import sys\nfrom nexus.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'pydantic') if m in sys.modules))"
    )
    proc = _run([], code)
    assert proc.returncode == 0, proc.stderr
    assert "specialize" in proc.stdout and "collect" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "command", [["jobs/specialize.py"], ["-m", "nexus", "specialize"]], ids=["job", "nexus"]
)
def test_the_job_is_a_nexus_command_with_one_line_errors(command):
    proc = _run([*command, "--bogus"])
    assert proc.returncode == 2
    assert proc.stderr == (
        "nexus specialize: error: unrecognized arguments: --bogus (see 'nexus specialize --help')\n"
    )
