"""Eval: horizons, conditions, baselines, K sweep, probe, determinism, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featurestore.encoders import init_random_dinov3
from featurestore.reader import TokenReader
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
    assert set(res.conditions) == {"actions", "null_action", "action_free"}
    tf_name = f"tf/{tf.last_checkpoint.name}"
    for cond, entry in res.conditions.items():
        # the teacher-forced baseline is a point forecast: beside it, itself plus noise of its own train-split error
        assert set(entry) == {res.model, "copy_last", tf_name, f"{tf_name}+noise"}, cond
        assert entry[tf_name]["samples"] == 1 and entry[f"{tf_name}+noise"]["samples"] == res.samples[res.model]
        assert entry[f"{tf_name}+noise"]["energy"] != entry[tf_name]["energy"]
        for errs in entry.values():
            assert set(errs["mse"]) == {1, 3, 6} and all(np.isfinite(v) for v in errs["mse"].values())
            assert all(0 <= v <= 2 for v in errs["cosine"].values())
    # per source: each condition's windows split by store source; here each condition has one source, whose
    # scores are then the condition's own (the model and copy-last alike)
    labelled = {"actions": "labelled", "null_action": "labelled", "action_free": "free"}
    for cond, by_src in res.per_source.items():
        assert sum(v["windows"] for v in by_src.values()) == res.windows[labelled[cond]]
        (only,) = by_src.values()
        for name in (res.model, "copy_last"):
            assert only[name]["mse"] == pytest.approx(res.conditions[cond][name]["mse"], rel=1e-6)
    assert set(res.per_source["actions"]) != set(res.per_source["action_free"])  # labelled vs free source
    # copy-last is recomputed here from the raw windows with the model's normalisation
    wm = LoadedWorldModel.load(tiny_run)

    wins = collect_windows(TokenReader(pusht_store), wm, _cfg(tiny_run, tmp_path), res.context)
    (w,) = wins["free"]  # one action-free source: one group of windows
    ctx = res.context
    mse3 = (((w.tokens[:, ctx - 1] - w.tokens[:, ctx + 2]) / wm.stats.token_std) ** 2).mean()
    assert res.conditions["action_free"]["copy_last"]["mse"][3] == pytest.approx(mse3, rel=1e-5)
    sweep = res.k_sweep
    assert set(sweep.mse) == {"1", "2", "4", "8"} and sweep.best_k in (1, 2, 4, 8)
    assert isinstance(sweep.k_within_10pct_of_best, bool)
    probe = res.probe["actions"]
    assert set(probe) == {"true_latents", "predicted_latents"} and len(probe["true_latents"]) == 3
    # how far the actions move each model's prediction, against how far the true frames move
    for name in (res.model, tf_name):
        eff = res.action_effect[name]
        assert set(eff["moved"]) == {1, 3, 6} and all(v >= 0 for v in eff["moved"].values())
        assert eff["share"][3] == pytest.approx(eff["moved"][3] / eff["true_change"][3])
    # the scene probe: out-of-fold R^2 to the simulator's state from the raw tokens and the model's input tokens
    scene = res.scene_probe["pusht"]
    assert set(scene["views"]) == {"raw/linear", "model/linear"}
    assert "block_x" in scene["views"]["model/linear"]["r2"]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["conditions"]["actions"]["copy_last"]["mse"]["1"] == pytest.approx(
        res.conditions["actions"]["copy_last"]["mse"][1])
    assert (tmp_path / "eval" / "error_vs_horizon.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "error_vs_k.png").exists()


def test_eval_is_deterministic_given_a_seed(tiny_run, tmp_path):
    a = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    b = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    assert a.conditions == b.conditions and a.k_sweep == b.k_sweep
    c = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False, seed=1))
    assert c.conditions["actions"]["copy_last"] == a.conditions["actions"]["copy_last"]
    assert c.conditions["actions"][a.model] != a.conditions["actions"][a.model]


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


def test_horizons_past_the_trained_window_slide_it(tiny_run, tmp_path):
    """tiny_run trained on 6-frame windows; with 3 context frames, h=6 needs 9: the rollout slides the window
    (every prediction inside the trained regime, tested against the uncached reference in test_trainer_model),
    eval.json says after which horizon; of a context longer than the window the model uses the last frames."""
    from rich.console import Console

    from trainer.eval import eval_tables

    res = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False))
    assert res.context == 3 and res.trained_window == 6
    assert res.slides_after_horizon == {res.model: 3}
    con = Console(record=True, width=250)
    con.print(eval_tables(res)[0])
    assert "slide the trained 6-frame window" in con.export_text()
    long = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False, context=8, horizons=(1, 2)))
    assert long.context_used == {res.model: 5}  # a longer context than the window: its last 5 frames


def test_energy_score_matches_a_hand_computed_value():
    from trainer.eval import energy_score

    # samples (0,0) and (3,4), truth (0,4): mean distance (4 + 3) / 2 = 3.5, minus |x1 - x2| = 5 weighted
    # 2 / (2 * 2 * 1) = 1/2 (fair form) -> 3.5 - 2.5 = 1.0; one sample: its distance
    xs = np.array([[[0.0, 0.0]], [[3.0, 4.0]]])
    y = np.array([[0.0, 4.0]])
    assert energy_score(xs, y) == pytest.approx([1.0])
    assert energy_score(xs[:1], y) == pytest.approx([4.0])
    # a proper score: the right spread beats a collapsed one for a 1-D standard normal truth (expected values)
    rng = np.random.default_rng(0)
    truth = rng.standard_normal((4000, 1))
    right = rng.standard_normal((8, 4000, 1))
    collapsed = np.zeros((8, 4000, 1))
    assert energy_score(right, truth).mean() < energy_score(collapsed, truth).mean()
    # fair at small S: 4 true draws beat 4 draws of 0.7x the spread (expected 0.707 vs 0.726 x sqrt(2/pi)); the
    # plain 1/(2 S^2) form would rank them the other way (0.884 vs 0.849)
    truth = rng.standard_normal((40_000, 1))
    right, narrow = rng.standard_normal((4, 40_000, 1)), 0.7 * rng.standard_normal((4, 40_000, 1))
    assert energy_score(right, truth).mean() < energy_score(narrow, truth).mean()


def test_state_distance_is_the_sample_means_distance_in_state_units():
    from trainer.eval import state_distance

    states = np.array([[[[0.0, 0.0]]], [[[2.0, 0.0]]]])  # 2 samples, 1 window, 1 horizon, a 2-D state
    assert state_distance(states, np.array([[[1.0, 3.0]]]), (1,)) == {1: pytest.approx(3.0)}


def test_a_proprio_model_is_scored_on_the_robot_state_it_predicts(pusht_store, tmp_path):
    """With proprioception eval also scores where the model says the robot goes (state units: pusht pixels),
    next to copy-last's standing still, on the same windows; a model without it has no state score."""
    run = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=5, proprio=True,
                                        labelled_fraction=0.5, action_mode="relative_to_state", context_frames=6))
    res = run_eval(_cfg(run.run_dir, tmp_path, probe=False, plots=False, samples=2, k_sweep=(1,),
                        baselines=()))
    wm = LoadedWorldModel.load(run.run_dir)
    win = collect_windows(TokenReader(pusht_store), wm, EvalConfig(ckpt=run.run_dir, horizons=(1, 3, 6),
                                                                    windows_per_episode=2), res.context)
    for cond, entry in res.conditions.items():
        groups = win["labelled" if cond != "action_free" else "free"]
        ctx = res.context
        still = np.concatenate([np.linalg.norm(w.frame_states[:, ctx + 5] - w.frame_states[:, ctx - 1], axis=-1)
                                for w in groups])
        assert entry["copy_last"]["state_dist"][6] == pytest.approx(still.mean())
        assert np.isfinite(list(entry[res.model]["state_dist"].values())).all()
    # the same model with and without its actions: the state it predicts differs
    assert res.conditions["actions"][res.model]["state_dist"] != \
        res.conditions["null_action"][res.model]["state_dist"]
    from trainer.eval import eval_tables

    state_table = [t for t in eval_tables(res) if "predicted robot state" in str(t.title)]
    assert len(state_table) == 1 and state_table[0].row_count == 2 * len(res.conditions)  # model, copy-last


@pytest.mark.parametrize("seed", range(5))
def test_sample_mean_mse_never_exceeds_the_mean_single_sample_mse(seed):
    from trainer.eval import moving_tokens, window_scores

    rng = np.random.default_rng(seed)
    S, W, P, Z = int(rng.integers(1, 6)), 3, 10, 4
    samples, truth = rng.standard_normal((S, W, P, Z)) * rng.uniform(0.1, 3), rng.standard_normal((W, P, Z))
    for mask in (None, moving_tokens(truth, rng.standard_normal((W, P, Z)), 0.2)):
        sc = window_scores(samples, truth, mask)
        assert (sc["mse"] <= sc["mse_single"] + 1e-12).all()
        if S == 1:  # one sample: the energy score is its RMSE
            np.testing.assert_allclose(sc["energy"], np.sqrt(sc["mse"]))
    mask = moving_tokens(truth, truth * 0, 0.2)
    assert (mask.sum(1) == 2).all()  # the top 20% of 10 tokens by |change|^2 (here |truth|^2)
    norms = (truth**2).sum(-1)
    assert (norms[mask].reshape(W, 2).min(1) >= np.where(mask, -np.inf, norms).max(1)).all()


def test_a_sampler_is_scored_on_several_samples_and_baselines_on_one(tiny_run, tmp_path):
    res = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False, samples=3, k_sweep=(1, 2)))
    entry = res.conditions["actions"]
    mine, copy = entry[res.model], entry["copy_last"]
    assert mine["samples"] == 3 and copy["samples"] == 1
    for h in (1, 3, 6):
        assert mine["mse"][h] <= mine["mse_single"][h]  # the mean of 3 samples beats one sample on average
        assert copy["mse"][h] == pytest.approx(copy["mse_single"][h])
        assert copy["energy"][h] > 0 and mine["mse_moving"][h] > 0
    # moving tokens changed more than the average token: copy-last is worse on them
    assert all(copy["mse_moving"][h] > copy["mse"][h] for h in (1, 3, 6))
    one = run_eval(_cfg(tiny_run, tmp_path, probe=False, plots=False, samples=1, k_sweep=(1, 2)))
    single = one.conditions["actions"][one.model]
    assert single["samples"] == 1 and all(single["mse"][h] == pytest.approx(single["mse_single"][h]) for h in (1, 3, 6))
    assert single["mse"][6] > mine["mse"][6]  # one sample carries the predictive variance the mean of 3 averages out
    assert set(res.k_sweep.energy) == {"1", "2"} and res.k_sweep.samples == 3
    assert "state_dist" not in mine and "state_dist" not in copy  # no proprioception, no state to score


def test_a_one_frame_context_of_a_one_camera_model_is_not_read_as_its_camera_axis(pusht_store, tmp_path):
    """[B, 1, P, Z] is one frame of one camera: eval (e.g. a DINO-WM-style run alone, whose 3-frame window
    gives a 1-frame default context) rolls out from it like from any context."""
    run = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=3, proprio=True,
                                        labelled_fraction=0.5, action_mode="relative_to_state", context_frames=6))
    res = run_eval(_cfg(run.run_dir, tmp_path, probe=False, plots=False, samples=1, k_sweep=(1,), context=1,
                        horizons=(1, 2)))
    assert res.context == 1 and res.context_used[res.model] == 1
    assert all(np.isfinite(res.conditions["actions"][res.model]["mse"][h]) for h in (1, 2))
