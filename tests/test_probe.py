"""The feature probe (`wmctl probe`): cross-validated kernel ridge from tokens to the simulator's state. It must
find a signal that is there, find none where there is none, and read real targets from a real recorded dataset."""

from __future__ import annotations

import numpy as np
import pytest

from featurestore.probe import ProbeConfig, cross_validated_r2, r2, run_probe


def test_cross_validated_r2_finds_a_linear_signal_and_no_signal_in_noise():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 30)  # 20 episodes of 30 frames
    Y = rng.standard_normal((600, 3))
    X = np.concatenate([Y @ rng.standard_normal((3, 200)), rng.standard_normal((600, 200))], 1) \
        + 0.05 * rng.standard_normal((600, 400))
    seen, _ = cross_validated_r2(X, Y, groups, kernel="linear")
    assert (seen > 0.95).all()
    blind, _ = cross_validated_r2(rng.standard_normal((600, 400)), Y, groups, kernel="linear")
    assert (blind < 0.1).all()
    # a target that is a smooth non-linear function of one feature: the RBF kernel reads it, a linear one cannot
    x = rng.uniform(-3, 3, (600, 1))
    Yn = np.cos(2 * x)
    lin, _ = cross_validated_r2(x, Yn, groups, kernel="linear")
    rbf, _ = cross_validated_r2(x, Yn, groups, kernel="rbf")
    assert lin[0] < 0.2 and rbf[0] > 0.8


def test_r2_is_relative_to_the_targets_spread():
    y = np.array([[1.0], [2.0], [3.0]])
    assert r2(y, y)[0] == 1.0 and r2(np.full_like(y, 2.0), y)[0] == 0.0 and r2(-y, y)[0] < 0


def test_probe_reads_simulator_targets_from_a_recorded_dataset(pusht_store):
    """On a real (tiny) pusht store: every target the simulator names is scored for each source recorded in it,
    out of fold over whole episodes; an unknown source is refused."""
    from pipeline.stage import UserError

    res = run_probe(ProbeConfig(store=pusht_store, max_frames=120))
    assert set(res["sources"]) == {"pusht", "pusht-free"} and res["encoder"]["random_weights"] is True
    for src in res["sources"].values():
        assert src["sim"] == "pusht" and src["episodes"] == 6 and src["frames"] == 120
        for view in ("raw/linear", "raw/rbf"):
            scores = src["views"][view]["r2"]
            assert list(scores) == ["agent_x", "agent_y", "block_x", "block_y", "block_sin", "block_cos"]
            assert all(np.isfinite(v) and v <= 1.0 for v in scores.values())
    with pytest.raises(UserError, match="no source 'nope'"):
        run_probe(ProbeConfig(store=pusht_store, source="nope"))
