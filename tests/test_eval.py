"""Eval: horizons, conditions, baselines, K sweep, probe, determinism, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.encoders import init_random_dinov3
from pipeline.cli import app
from pipeline.stage import ConfigMismatchError, UserError
from trainer.api import LoadedWorldModel
from trainer.config import tiny
from trainer.eval import EvalConfig, collect_windows, run_eval
from trainer.loop import run_train


def _cfg(run, tmp_path, **kw):
    return EvalConfig(**{"ckpt": run, "horizons": (1, 3, 6), "windows_per_episode": 2, "out": tmp_path / "eval", **kw})


def test_eval_reports_every_condition_against_copy_last_and_a_baseline(tiny_run, pusht_store, tmp_path):
    tf = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "tf", steps=10,
                                       model=dataclasses.replace(tiny().model, kind="teacher_forced"),
                                       action_mode="relative_to_state", context_frames=6))
    res = run_eval(_cfg(tiny_run, tmp_path, baselines=(tf.run_dir,)))
    assert set(res["conditions"]) == {"actions", "null_action", "action_free"}
    for cond, entry in res["conditions"].items():
        assert set(entry) == {res["model"], "copy_last", f"tf/{tf.last_checkpoint.name}"}, cond
        for errs in entry.values():
            assert set(errs["mse"]) == {1, 3, 6} and all(np.isfinite(v) for v in errs["mse"].values())
            assert all(0 <= v <= 2 for v in errs["cosine"].values())
    # copy-last is recomputed here from the raw windows with the model's normalisation
    wm = LoadedWorldModel.load(tiny_run)
    from featurestore.reader import TokenReader

    wins = collect_windows(TokenReader(pusht_store), wm, _cfg(tiny_run, tmp_path), res["context"])
    w = wins["free"]
    ctx = res["context"]
    mse3 = (((w.tokens[:, ctx - 1] - w.tokens[:, ctx + 2]) / wm.stats.token_std) ** 2).mean()
    assert res["conditions"]["action_free"]["copy_last"]["mse"][3] == pytest.approx(mse3, rel=1e-5)
    sweep = res["k_sweep"]
    assert set(sweep["mse"]) == {"1", "2", "4", "8"} and sweep["best_k"] in (1, 2, 4, 8)
    assert isinstance(sweep["k_within_10pct_of_best"], bool)
    probe = res["probe"]["actions"]
    assert set(probe) == {"true_latents", "predicted_latents"} and len(probe["true_latents"]) == 3
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["conditions"]["actions"]["copy_last"]["mse"]["1"] == pytest.approx(
        res["conditions"]["actions"]["copy_last"]["mse"][1])
    assert (tmp_path / "eval" / "error_vs_horizon.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "error_vs_k.png").exists()


def test_eval_is_deterministic_given_a_seed(tiny_run, tmp_path):
    a = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    b = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    assert a["conditions"] == b["conditions"] and a["k_sweep"] == b["k_sweep"]
    c = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False, seed=1))
    assert c["conditions"]["actions"]["copy_last"] == a["conditions"]["actions"]["copy_last"]
    assert c["conditions"]["actions"][a["model"]] != a["conditions"]["actions"][a["model"]]


def test_bad_input_is_a_clear_error(tiny_run, pusht_manifest, tmp_path):
    with pytest.raises(UserError, match="horizon 500 .* longest val episode has 24"):
        run_eval(_cfg(tiny_run, tmp_path, horizons=(1, 500)))
    with pytest.raises(UserError, match="no committed 'nope' episodes"):
        run_eval(_cfg(tiny_run, tmp_path, split="nope"))
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess

    other = tmp_path / "other.zarr"
    run_encode(EncodeConfig(manifest=pusht_manifest, store=other, preprocess=Preprocess(height=64, width=64),
                            encoder=str(init_random_dinov3(tmp_path / "enc2", seed=3)), threads=1))
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        run_eval(_cfg(tiny_run, tmp_path, store=other))


def test_eval_cli_defaults_to_the_newest_run(tiny_run, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mine").symlink_to(tiny_run)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["eval", "--horizons", "1,2", "--episodes", "1"])
    assert r.exit_code == 0, r.output
    assert "copy_last" in r.output and "linear probe" in r.output
    r = CliRunner().invoke(app, ["eval", "--horizons", "0"])
    assert r.exit_code == 2 and "positive" in r.output


def test_horizons_past_the_trained_window_are_marked(tiny_run, tmp_path):
    """tiny_run trained on 6-frame windows; with 3 context frames, h=6 needs 9: marked in eval.json and the table."""
    from rich.console import Console

    from trainer.eval_report import eval_tables

    res = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    assert res["context"] == 3 and res["trained_window"] == 6
    assert res["beyond_trained_window"] == [6]
    con = Console(record=True, width=200)
    con.print(eval_tables(res)[0])
    text = con.export_text()
    assert "h=6*" in text and "h=3*" not in text and "a regime nothing trained" in text
