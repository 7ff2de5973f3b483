"""Calibration sets: the tokens' fingerprint that a resumed run checks."""

import torch
from tests.conftest import random_calib

from gisp.core.calibration import CalibrationSet


def test_fingerprint_follows_the_tokens_only():
    a, b = random_calib(seed=0), random_calib(seed=0)
    b.provenance = {"name": "renamed"}
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert a.fingerprint() != random_calib(seed=1).fingerprint()
    changed = random_calib(seed=0)
    changed.samples[3] = changed.samples[3].clone()
    changed.samples[3][5] += 1  # one token differs
    assert changed.fingerprint() != a.fingerprint()
    assert CalibrationSet(a.samples[:-1]).fingerprint() != a.fingerprint()
    as_int32 = CalibrationSet([s.to(torch.int32) for s in a.samples])
    assert as_int32.fingerprint() != a.fingerprint()  # dtype and shape are part of it
    nested = CalibrationSet([{"ids": torch.arange(4), "gold": 1}, ("x", [1, 2])])
    assert nested.fingerprint() == CalibrationSet([{"gold": 1, "ids": torch.arange(4)}, ("x", [1, 2])]).fingerprint()
