"""Schedules rise monotonically from 0 and end exactly at the target."""

import pytest

from gisp.core.schedule import SCHEDULES, targets
from gisp.errors import GispError


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 112])
def test_monotone_and_exact_at_the_end(schedule, steps):
    t = targets(schedule, 0.5, steps)
    assert len(t) == steps and t[-1] == 0.5
    assert all(0 < a <= b for a, b in zip(t, t[1:]))


def test_linear_steps_are_equal_and_exp_steps_shrink():
    lin = targets("linear", 0.4, 4)
    assert lin == pytest.approx([0.1, 0.2, 0.3, 0.4])
    exp = targets("exp", 0.5, 5)
    incs = [b - a for a, b in zip([0.0] + exp, exp)]
    assert all(x > y for x, y in zip(incs, incs[1:]))


def test_bad_schedule_and_step_count():
    with pytest.raises(GispError, match="unknown schedule"):
        targets("step", 0.5, 4)
    with pytest.raises(GispError, match="at least 1"):
        targets("linear", 0.5, 0)
