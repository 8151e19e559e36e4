"""Experiment tracking: TensorBoard event files of training and eval (read back with tensorboard's own reader),
optional extras refused clearly when missing, `none` writes nothing but metrics.jsonl."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from pipeline.stage import UserError
from trainer.config import tiny
from trainer.eval import EvalConfig, run_eval
from trainer.loop import run_train


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_training_and_eval_curves_land_in_tensorboard(pusht_store, tmp_path):
    run = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=10, eval_every=5,
                                        log_every=5, labelled_fraction=0.5, context_frames=6)).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = _events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "step_time", "data_wait", "tokens_per_s", "val_loss", "val_pred_mse", "val_copy_mse"):
        assert f"train/{key}" in tags, key
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows if "loss" in r]  # metrics.jsonl is mirrored
    assert loss[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
    res = run_eval(EvalConfig(ckpt=run, horizons=(1, 3), windows_per_episode=2, probe=False, samples=2,
                              k_sweep=(1, 2)))  # eval into the run: its figures land beside the training curves
    acc = _events(run / "tensorboard")
    curve = acc.Scalars("eval/actions/mse/model")
    assert [e.step for e in curve] == [1, 3]  # error over the horizon
    assert curve[1].value == pytest.approx(res["conditions"]["actions"][res["model"]]["mse"][3], rel=1e-6)
    assert "eval/actions/energy/copy_last" in acc.Tags()["scalars"]
    assert {"eval/error_vs_horizon", "eval/error_vs_k"} <= set(acc.Tags()["images"])


def test_tracker_none_and_missing_extras(pusht_store, tmp_path):
    cfg = dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "quiet", steps=2, tracker="none",
                              eval_every=100)
    run_train(cfg)
    assert (tmp_path / "quiet" / "metrics.jsonl").exists() and not (tmp_path / "quiet" / "tensorboard").exists()
    with pytest.raises(UserError, match="tracker 'mlflow'"):
        dataclasses.replace(cfg, tracker="mlflow")
    for extra in ("wandb", "trackio"):
        if importlib.util.find_spec(extra) is not None:
            continue  # installed here: nothing to refuse
        with pytest.raises(UserError, match=rf"pip install 'wmctl\[{extra}\]'"):
            run_train(dataclasses.replace(cfg, out=tmp_path / extra, tracker=extra))
