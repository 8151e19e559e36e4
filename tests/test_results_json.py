"""Typed results (EvalResult, SimResult, OfflineResult) write exactly the JSON written before them.

tests/data/results_before/ holds eval.json, sim.json and offline_cem.json as the code before the typed results wrote
them (commit bdfb1be, through `wmctl eval` / `plan sim` / `plan offline` on the inputs the fixtures here build: the
tiny run, a 10-step teacher-forced baseline, a Meta-World reach run with proprioception; only the machine's folder
names in paths replaced by demo/ and out/). Each is read back (`from_json`) and written again (`to_json`): the same
JSON byte for byte, as its file and after json.dumps(sort_keys=True); and a fresh eval on the same inputs writes a
file of the same shape (every key at every level, every value's type) whose content is its result's `to_json()`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.stage import to_jsonable
from planner.offline import OfflineResult
from planner.results import Latency, PolicyResult, SimResult, compare_sims
from trainer.eval import EvalConfig, EvalResult, KSweep, eval_tables, run_eval

BEFORE = Path(__file__).parent / "data" / "results_before"
CASES = {"eval.json": EvalResult, "eval_two_cameras_proprio.json": EvalResult, "eval_teacher_forced.json": EvalResult,
         "sim_pusht.json": SimResult, "sim_metaworld.json": SimResult, "offline_cem.json": OfflineResult}


def _as_written(obj) -> str:
    """What `atomic_write_json` writes."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_result_written_before_reads_back_and_writes_the_same_json(name):
    text = (BEFORE / name).read_text()
    before = json.loads(text)
    res = CASES[name].from_json(before)
    assert json.dumps(res.to_json(), sort_keys=True) == json.dumps(before, sort_keys=True)
    assert _as_written(res.to_json()) == text  # the file itself, byte for byte
    again = CASES[name].from_json(json.loads(_as_written(res.to_json())))
    assert again == res


def test_an_eval_result_read_back_has_the_keys_run_eval_gives():
    """JSON writes horizon and K keys as strings; read back, they are the ints `run_eval` returns (the report and
    the tracker index them by int), except the per-K score maps of the K sweep, which eval.json always keyed by
    str(K)."""
    res = EvalResult.from_json(json.loads((BEFORE / "eval.json").read_text()))
    scores = res.conditions["actions"][res.model]
    assert set(scores["mse"]) == set(res.horizons) == {1, 3, 6} and scores["samples"] == res.samples[res.model]
    assert all(set(v) == {1, 3, 6} for k, v in scores.items() if k != "samples")
    assert isinstance(res.k_sweep, KSweep) and set(res.k_sweep.mse) == {"1", "2", "4", "8"}
    assert set(res.k_sweep.mean_energy) == {1, 2, 4, 8} and res.k_sweep.best_k in res.k_sweep.mean_energy
    assert set(res.probe["actions"]["true_latents"]) <= {1, 3, 6}
    assert all(set(e["share"]) == {1, 3, 6} for e in res.action_effect.values())
    only = next(iter(res.per_source["actions"].values()))
    assert isinstance(only["windows"], int) and set(only[res.model]["mse"]) == {1, 3, 6}
    assert len(eval_tables(res)) >= 4  # the report reads a loaded result as it reads a fresh one
    cams = EvalResult.from_json(json.loads((BEFORE / "eval_two_cameras_proprio.json").read_text()))
    row = cams.conditions["actions"][cams.model]
    assert set(row["cameras"]) == set(cams.cameras) and set(row["state_dist"]) == set(cams.horizons)
    tf = EvalResult.from_json(json.loads((BEFORE / "eval_teacher_forced.json").read_text()))
    assert tf.k_sweep is None and "k_sweep" not in tf.to_json()  # a point forecast has no K sweep


def test_optional_eval_fields_are_written_only_when_present():
    before = json.loads((BEFORE / "eval.json").read_text())
    res = EvalResult.from_json(before)
    bare = dataclasses.replace(res, k_sweep=None, action_effect=None, probe=None, scene_probe=None, plots=None,
                               out="/elsewhere")
    assert set(res.to_json()) - set(bare.to_json()) == {"k_sweep", "action_effect", "probe", "scene_probe", "plots"}
    no_states = dataclasses.replace(res, probe=None)  # --probe on a store without states: "probe": null
    assert no_states.to_json()["probe"] is None and "scene_probe" in no_states.to_json()
    assert "out" not in res.to_json() and "out" not in bare.to_json()


def test_sim_and_offline_results_read_by_attribute():
    mw = SimResult.from_json(json.loads((BEFORE / "sim_metaworld.json").read_text()))
    assert list(mw.policies) == ["model", "random", "scripted"] and mw.simulator["simulator"] == "metaworld"
    assert isinstance(mw.model, PolicyResult) and isinstance(mw.model.latency_s, Latency)
    assert mw.scripted.latency_s is None and mw.model.latency_s.p50 > 0
    assert {k for k in mw.model.distances if k.startswith("final_")} == {"final_eef_dist", "final_obj_dist"}
    pusht = SimResult.from_json(json.loads((BEFORE / "sim_pusht.json").read_text()))
    assert list(pusht.policies) == ["model", "random"] and pusht.scripted is None and len(pusht.strips) == 2
    assert len(pusht.model.per_trial) == pusht.trials and pusht.config["planner"] == "cem"
    c = compare_sims([(pusht, pusht)])  # typed results pair as sim.json contents do
    assert c == compare_sims([(pusht.to_json(), pusht.to_json())]) and c["only_a"] == c["only_b"] == 0
    off = OfflineResult.from_json(json.loads((BEFORE / "offline_cem.json").read_text()))
    assert off.latency_s.p50 > 0 and off.problems == len(off.rows) and off.judge.startswith("tf/")
    assert set(off.latent_distance) == {"model_same_noise", "model_fresh_noise", "judge"}


def _shape(obj, models: dict[str, str]):
    """The JSON's skeleton: keys at every level (model names as their role), value types (ints and floats alike:
    a float that happens to be whole is still a number)."""
    if isinstance(obj, dict):
        return {models.get(k, k): _shape(v, models) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(v, models) for v in obj]
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__


@pytest.mark.slow
def test_a_fresh_eval_writes_the_json_of_before_on_the_same_inputs(tiny_run, pusht_store, tmp_path):
    """The inputs the file in results_before/ was written from (conftest's tiny run, the teacher-forced baseline of
    test_eval): today's eval writes a file of the same shape, and that file is its result's to_json()."""
    from trainer.config import tiny
    from trainer.loop import run_train

    tf = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "tf", steps=10,
                                       model=dataclasses.replace(tiny().model, kind="teacher_forced"),
                                       action_mode="relative_to_state", context_frames=6)).run_dir
    res = run_eval(EvalConfig(ckpt=tiny_run, horizons=(1, 3, 6), baselines=(tf,), out=tmp_path / "eval",
                              tracker="none"))
    text = (tmp_path / "eval" / "eval.json").read_text()
    assert text == _as_written(res.to_json())
    assert EvalResult.from_json(json.loads(text)) == dataclasses.replace(res, out=None)
    before = json.loads((BEFORE / "eval.json").read_text())
    roles = lambda d: {d["model"]: "<model>", **{m: "<baseline>" for m in d["samples"] if m != d["model"]},  # noqa: E731
                       **{f"{m}+noise": "<baseline>+noise" for m in d["samples"] if m != d["model"]}}
    now = json.loads(text)
    assert _shape(now, roles(now)) == _shape(before, roles(before))
