"""Golden numbers (torchtitan's refactor check): the `tiny` preset, trained with a fixed seed on a synthetic
token store, gives the same losses step by step. A change of layout must not move them; a change that does
(a new objective, a new sampler) updates them here on purpose, saying why in its commit."""

from __future__ import annotations

import dataclasses

import pytest
from synthetic import write_token_world

from trainer.config import tiny
from trainer.loop import run_train

CASES = {
    "shortcut": {},
    "shortcut_proprio_clean_context": dict(proprio=True, context_mode="clean_context",
                                           action_mode="relative_to_state", labelled_fraction=0.5),
    "teacher_forced": dict(kind="teacher_forced"),
}

# measured on the layout before the package redesign (commit 52aa6ee), CPU, float32
GOLDEN = {
    "shortcut": {
        "loss": [0.2135477, 0.1750593, 0.12045, 0.1057191, 0.1647217, 0.2078536, 0.06465329, 0.1868776],
        "val_loss": 0.1486949, "val_pred_mse": 0.1513354,
    },
    "shortcut_proprio_clean_context": {
        "loss": [0.1882155, 0.1890099, 0.0798343, 0.1204081, 0.2319707, 0.2678995, 0.0866804, 0.1634593],
        "val_loss": 0.1694847, "val_pred_mse": 0.1487151,
    },
    "teacher_forced": {
        "loss": [1.301596, 1.313144, 1.286849, 1.230894, 1.195704, 1.13629, 1.11841, 1.114481],
        "val_loss": 1.112144, "val_pred_mse": 1.184962,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_preset_losses_match_the_golden_numbers(tmp_path, case):
    kw = dict(CASES[case])
    cfg = tiny()
    if "kind" in kw:
        kw["model"] = dataclasses.replace(cfg.model, kind=kw.pop("kind"))
    cfg = dataclasses.replace(cfg, store=write_token_world(tmp_path / "world.zarr"), out=tmp_path / "run", steps=8,
                              eval_every=8, ckpt_every=8, **kw)
    rows = run_train(cfg).metrics
    want = GOLDEN[case]
    assert [r["loss"] for r in rows] == pytest.approx(want["loss"], rel=1e-5)
    assert rows[-1]["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert rows[-1]["val_pred_mse"] == pytest.approx(want["val_pred_mse"], rel=1e-5)
