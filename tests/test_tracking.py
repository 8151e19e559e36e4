"""Experiment tracking: TensorBoard event files of training and eval (read back with tensorboard's own reader),
optional extras refused clearly when missing, `none` writes nothing but metrics.jsonl."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import types

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.stage import UserError
from trainer.config import tiny
from trainer.eval import EvalConfig, run_eval
from trainer.loop import run_train
from trainer.runs import saved_config


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_training_and_eval_curves_land_in_tensorboard(pusht_store, tmp_path):
    run = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=10, eval_every=5,
                                        log_every=5, ckpt_every=5, labelled_fraction=0.5, context_frames=6)).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = _events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "step_time", "data_wait", "tokens_per_s", "val_loss", "val_pred_mse", "val_copy_mse"):
        assert f"train/{key}" in tags, key
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows if "loss" in r]  # metrics.jsonl is mirrored
    assert loss[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
    results = {}
    for step in (5, 10):  # eval into the run, checkpoint after checkpoint: figures beside the training curves
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        results[step] = run_eval(EvalConfig(ckpt=ckpt, horizons=(1, 3), windows_per_episode=2, probe=False,
                                            samples=2, k_sweep=(1, 2), out=None))
    acc = _events(run / "tensorboard")
    for h in (1, 3):  # one curve per horizon, over the training steps of the checkpoints evaluated
        curve = acc.Scalars(f"eval/actions/mse/model/h{h}")
        assert [e.step for e in curve] == [5, 10]
        for e in curve:
            res = results[e.step]
            assert e.value == pytest.approx(res.conditions["actions"][res.model]["mse"][h], rel=1e-6)
    assert "eval/actions/energy/copy_last/h3" in acc.Tags()["scalars"]
    assert not any(t.startswith("eval/") and not t.rsplit("/", 1)[-1].startswith("h") for t in acc.Tags()["scalars"])
    assert {"eval/error_vs_horizon", "eval/error_vs_k"} <= set(acc.Tags()["images"])
    assert {e.step for e in acc.Images("eval/error_vs_horizon")} == {5, 10}


class _FakeWandb(types.ModuleType):
    """The few calls wmctl makes of wandb, recorded (the extra is not installed here; no network either)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.metrics, self.rows = [], [], []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def define_metric(self, name, **kw):
                fake.metrics.append((name, kw.get("step_metric")))

            def log(self, row, step=None):
                assert step is None, "rows carry their training step as a metric, never as W&B's step"
                fake.rows.append(row)

            def finish(self):
                pass

        return Run()

    @staticmethod
    def Image(path):  # noqa: N802 - wandb's name
        return ("image", path)


def test_wandb_gets_the_run_project_entity_tags_and_eval_at_the_checkpoint_step(pusht_store, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--store", str(pusht_store), "--preset", "tiny", "--out", str(out),
                                 "--steps", "6", "--set", "eval_every=3", "--set", "ckpt_every=3", "--tracker", "wandb",
                                 "--wandb-project", "wm-droid", "--wandb-entity", "lab", "--wandb-tags", "base,droid"])
    assert r.exit_code == 0, r.output
    cfg = saved_config(out)
    assert (cfg.wandb_project, cfg.wandb_entity, cfg.wandb_tags) == ("wm-droid", "lab", ("base", "droid"))
    init = fake.inits[0]
    assert (init["project"], init["entity"], init["tags"]) == ("wm-droid", "lab", ["base", "droid"])
    assert init["config"]["wandb_project"] == "wm-droid" and init["resume"] == "allow"
    assert ("train/*", "global_step") in fake.metrics and ("eval/*", "global_step") in fake.metrics
    assert [r["global_step"] for r in fake.rows] == list(range(1, 7))
    fake.rows.clear()
    for step in (6, 3):  # the later checkpoint first: W&B keeps the earlier one's figures anyway (own x axis)
        run_eval(EvalConfig(ckpt=out / "checkpoints" / f"step-{step:08d}", horizons=(1, 2),
                            windows_per_episode=2, probe=False, samples=2, k_sweep=(1, 2), tracker="wandb"))
    assert [i["id"] for i in fake.inits] == [init["id"]] * 3  # the evals continue the training run
    assert all((i["project"], i["entity"]) == ("wm-droid", "lab") for i in fake.inits)
    scalars = [r for r in fake.rows if "eval/actions/mse/model/h2" in r]
    assert [r["global_step"] for r in scalars] == [6, 3]


def test_wandb_options_without_the_wandb_tracker_are_recorded_and_say_so(pusht_store, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="wmctl"):
        r = CliRunner().invoke(app, ["train", "--store", str(pusht_store), "--preset", "tiny", "--out", str(out),
                                     "--steps", "1", "--tracker", "none", "--wandb-project", "wm-droid"])
    assert r.exit_code == 0, r.output
    assert saved_config(out).wandb_project == "wm-droid"  # a later `wmctl eval --tracker wandb` logs there
    assert any("tracks with none" in m for m in caplog.messages)


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
