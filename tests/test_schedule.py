"""The learning-rate schedule against its closed form, through the optimizer ``nexus train`` builds.

Linear warmup over ``warmup_steps`` (step s, 0-based, gets (s + 1) / warmup), then cosine from
1 down to ``min_lr_ratio`` over the remaining ``total - warmup`` steps, flat after the end:
``factor(s) = r + (1 - r) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``.
"""

from __future__ import annotations

import math

import pytest
import torch

from nexus.stages.train import TrainConfig
from nexus.stages.train.core import make_optimizer
from nexus.stages.train.schedule import lr_factor

SQRT_HALF = math.sqrt(0.5)  # cos(pi / 4)

#: (step, factor) for warmup 4, total 20, floor 0.1, from the closed form by hand: after warmup
#: the cosine runs over 16 steps, so steps 8, 12 and 16 are a quarter, half and three quarters
CLOSED_FORM = [
    (0, 0.25),
    (1, 0.5),
    (3, 1.0),
    (4, 1.0),
    (8, 0.1 + 0.9 * (1 + SQRT_HALF) / 2),
    (12, 0.1 + 0.9 / 2),
    (16, 0.1 + 0.9 * (1 - SQRT_HALF) / 2),
    (20, 0.1),
    (27, 0.1),
]


@pytest.mark.parametrize(("step", "want"), CLOSED_FORM)
def test_lr_factor_equals_the_closed_form(step, want):
    got = lr_factor(step, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert math.isclose(got, want, rel_tol=1e-12), (step, got, want)


def test_no_warmup_starts_at_the_peak_and_ends_at_the_floor():
    f = [lr_factor(s, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) for s in range(11)]
    assert f[0] == 1.0 and f[10] == 0.0
    assert math.isclose(f[5], 0.5, rel_tol=1e-12)  # half way: cos(pi / 2) = 0
    assert math.isclose(f[2], (1 + math.cos(math.pi * 0.2)) / 2, rel_tol=1e-12)


def test_the_training_optimizer_follows_the_schedule_step_by_step():
    """The learning rate ``nexus train`` applies at optimizer step s is lr x factor(s)."""
    cfg = TrainConfig(
        model="m", corpus=["c"], output="o", lr=3e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.1
    )
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = make_optimizer([param], cfg)
    applied = {}
    for step in range(28):
        applied[step] = scheduler.get_last_lr()[0]  # what the loop records, before stepping
        assert optimizer.param_groups[0]["lr"] == applied[step]
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    for step, want in CLOSED_FORM:
        assert math.isclose(applied[step], 3e-3 * want, rel_tol=1e-12), step
