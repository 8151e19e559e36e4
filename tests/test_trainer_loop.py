"""Training loop: sampler, checkpoints, exact resume after SIGKILL, torchrun DDP, NaN stop, encoder checks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featurestore.encode import EncodeConfig, run_encode
from featurestore.encoders import Preprocess, init_random_dinov3
from featurestore.reader import TokenReader
from featurestore.store import StoreLayout
from pipeline.cli import app
from pipeline.stage import ConfigMismatchError, UserError
from trainer.checkpoint import complete_checkpoints, latest_checkpoint, load_state, load_weights
from trainer.config import apply_overrides, tiny
from trainer.data import StepBatches, WindowSampler, compute_stats
from trainer.loop import TrainingDiverged, run_train
from trainer.sources import token_shape


def _encode(manifest: Path, store: Path, encoder: Path) -> None:
    run_encode(EncodeConfig(manifest=manifest, store=store, encoder=str(encoder), preprocess=Preprocess(height=64,
                            width=64), layout=StoreLayout(episodes_per_segment=4), batch_size=16, threads=1))


def _cfg(store: Path, out: Path, **kw):
    return dataclasses.replace(tiny(), store=store, out=out, **kw)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _cli(cfg, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", "--store", str(cfg.store), "--preset", "tiny", "--out",
            str(cfg.out), "--steps", str(cfg.steps), *extra]


def test_tiny_training_writes_checkpoints_metrics_and_learns(pusht_store, tmp_path):
    cfg = _cfg(pusht_store, tmp_path / "run", steps=40, ckpt_every=10, keep_last=2, labelled_fraction=0.5)
    res = run_train(cfg)
    assert res.step == 40 and (res.run_dir / "DONE").exists()
    assert [p.name for p in complete_checkpoints(res.run_dir)] == ["step-00000030", "step-00000040"]
    state = load_state(res.last_checkpoint)
    assert state["config"]["steps"] == 40 and state["encoder"] == TokenReader(pusht_store).encoder
    assert state["data_cursor"]["next_step"] == 41 and len(state["stats"]["token_mean"]) == 32
    rows = res.metrics
    assert {"loss", "loss_flow", "loss_boot", "lr", "grad_norm", "tokens_per_s", "data_wait"} <= set(rows[-1])
    assert any("loss_labelled" in r for r in rows) and any("loss_action_free" in r for r in rows)
    assert "val_loss" in rows[-1] and "val_copy_mse" in rows[-1]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first
    assert json.loads((res.run_dir / "config.json").read_text())["model"]["kind"] == "shortcut"


def test_teacher_forced_baseline_trains_with_the_same_interface(pusht_store, tmp_path):
    cfg = _cfg(pusht_store, tmp_path / "tf", steps=20, model=dataclasses.replace(tiny().model, kind="teacher_forced"))
    res = run_train(cfg)
    assert res.step == 20 and "val_pred_mse" in res.metrics[-1]
    assert set(load_weights(res.last_checkpoint, "ema")) == set(load_weights(res.last_checkpoint, "model"))


def test_sampler_is_stateless_and_ranks_split_the_global_batch(pusht_store):
    cfg = _cfg(pusht_store, None, batch_size=3, labelled_fraction=0.5)
    reader = TokenReader(pusht_store)
    shape = token_shape(reader, cfg)
    stats = compute_stats(reader, cfg, shape)
    s = WindowSampler(reader, cfg)
    assert s.global_batch(7, 6) == s.global_batch(7, 6) and s.global_batch(7, 6) != s.global_batch(8, 6)
    eps = reader.episodes
    for smp in s.global_batch(3, 50):
        e = eps.iloc[smp.row]
        assert e.split == "train" and smp.start + cfg.context_frames <= e.length
        assert smp.labelled == bool(e.has_actions)
    share = np.mean([smp.labelled for st in range(20) for smp in s.global_batch(st, 10)])
    assert 0.35 < share < 0.65
    one = StepBatches(reader, dataclasses.replace(cfg, batch_size=6), stats, shape, start_step=5, rank=0, world=1)
    r0 = StepBatches(reader, cfg, stats, shape, start_step=5, rank=0, world=2)
    r1 = StepBatches(reader, cfg, stats, shape, start_step=5, rank=1, world=2)
    big, a, b = one.micro_batches(5)[0], r0.micro_batches(5)[0], r1.micro_batches(5)[0]
    for key in ("z", "actions", "action_valid", "sample_ids"):
        torch.testing.assert_close(big[key], torch.cat([a[key], b[key]]))


def test_train_fps_sets_the_frameskip_from_each_store_s_rate(multicam_manifest, pusht_store, tiny_encoder, tmp_path,
                                                             monkeypatch):
    """`wmctl train --fps 5`: frameskip 3 on the 15-fps multi-camera store, with one action per model frame (its 3
    steps added up by the registry's action_kind: 8 wide, not 24; a labelled source without a kind is refused), 1
    on the same data encoded at 5 fps (`encode --fps 5`); a rate the store cannot serve and sources stored at
    rates needing different frameskips are refused with the sources and the fix named."""
    import shutil

    from trainer.api import LoadedWorldModel
    from trainer.config import tiny

    kinds = ("delta",) * 6 + ("absolute",) * 2
    enc = dict(encoder=str(tiny_encoder), preprocess=Preprocess(height=64, width=64),
               layout=StoreLayout(episodes_per_segment=4), batch_size=16, threads=1)
    run_encode(EncodeConfig(manifest=multicam_manifest, store=tmp_path / "full.zarr", **enc))
    run_encode(EncodeConfig(manifest=multicam_manifest, store=tmp_path / "5fps.zarr", fps=5.0, action_kind=kinds,
                            **enc))
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("WMCTL_REGISTRY", str(registry))
    with pytest.raises(UserError, match=r"source multicam has actions but no `action_kind`"):
        run_train(dataclasses.replace(tiny(), store=tmp_path / "full.zarr", out=tmp_path / "r0", steps=1, fps=5.0))
    (registry / "multicam.toml").write_text(f'repo_id = "local/multicam"\naction_kind = {list(kinds)}\n'
                                            .replace("'", '"'))
    for store, skip in (("full.zarr", 3), ("5fps.zarr", 1)):
        out = tmp_path / f"run-{skip}"
        run_train(dataclasses.replace(tiny(), store=tmp_path / store, out=out, steps=2, fps=5.0,
                                      labelled_fraction=None, eval_every=100, ckpt_every=2))
        saved = json.loads((out / "config.json").read_text())
        assert saved["frameskip"] == skip and saved["fps"] == 5.0
        assert tuple(saved["action_kinds"]) == (kinds if skip > 1 else ())
        wm = LoadedWorldModel.load(out)  # the planner's action: one 8-D action per model frame either way
        assert wm.actions.frame_dim == wm.shape.action_dim == 8 and len(wm.actions.bounds()[0]) == 8
    from planner.offline import OfflineConfig, run_plan_offline
    from trainer.eval import EvalConfig, run_eval

    res = run_eval(EvalConfig(ckpt=tmp_path / "run-3", horizons=(1, 2), samples=1, k_sweep=(1,), probe=False,
                              plots=False, out=tmp_path / "eval3"))  # the windows' actions added up the same way
    assert np.isfinite(res.conditions["actions"][res.model]["mse"][2])
    plan = run_plan_offline(LoadedWorldModel.load(tmp_path / "run-3"), TokenReader(tmp_path / "full.zarr"),
                            OfflineConfig(goal_offset=2, episodes=1, starts_per_episode=1, split="train"))
    assert plan.problems == 1 and np.isfinite(plan.rows[0]["action_error"])
    with pytest.raises(UserError, match=r"--fps 2: source multicam is at 5 fps.*nearest it can serve: 1.66667 or 2.5"):
        run_train(dataclasses.replace(tiny(), store=tmp_path / "5fps.zarr", out=tmp_path / "r2", steps=2, fps=2.0))
    mixed = tmp_path / "mixed.zarr"  # pusht (10 fps) and the multi-camera set at 5 fps in one store
    shutil.copytree(pusht_store, mixed)
    run_encode(EncodeConfig(manifest=multicam_manifest, store=mixed, fps=5.0, action_kind=kinds, **enc))
    with pytest.raises(UserError, match=r"the labelled sources are stored at different rates \(multicam \(stored at "
                                        r"5 fps: every 1\), pusht \(stored at 10 fps: every 2\)"):
        run_train(dataclasses.replace(tiny(), store=mixed, out=tmp_path / "r3", steps=2, fps=5.0))


def test_mix_weights_set_each_source_share(pusht_store, tmp_path, monkeypatch):
    """Registry / config mix weights decide each source's share of the windows (10,000 drawn: within +-1%),
    the resolved weights are recorded in the run, and its metrics log the realised share."""
    cfg = _cfg(pusht_store, None, mix_weights=(("pusht", 0.05), ("pusht-free", 0.95)))
    reader = TokenReader(pusht_store)
    s = WindowSampler(reader, cfg)
    draws = [smp for st in range(100) for smp in s.global_batch(st, 100)]
    share = np.mean([smp.source == "pusht" for smp in draws])
    assert abs(share - 0.05) <= 0.01, share
    eps = reader.episodes
    assert all(smp.labelled == bool(eps.iloc[smp.row].has_actions) and smp.source == eps.iloc[smp.row].source
               for smp in draws)
    flipped = WindowSampler(reader, dataclasses.replace(cfg, mix_weights=(("pusht", 0.95), ("pusht-free", 0.05))))
    assert abs(np.mean([x.source == "pusht" for st in range(100) for x in flipped.global_batch(st, 100)]) - 0.95) \
        <= 0.01
    # the registry's mix_weight for a source of its name, a default of 1 for the others, recorded in the run
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "pusht.toml").write_text('repo_id = "local/pusht"\nmix_weight = 0.25\n')
    monkeypatch.setenv("WMCTL_REGISTRY", str(registry))
    res = run_train(_cfg(pusht_store, tmp_path / "mix", steps=2, ckpt_every=100))
    saved = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert saved["labelled_fraction"] is None and saved["mix_weights"] == [["pusht", 0.25], ["pusht-free", 1.0]]
    assert all(abs(r["mix_pusht"] + r["mix_pusht-free"] - 1.0) < 1e-9 for r in res.metrics)
    with pytest.raises(UserError, match="does not hold"):
        run_train(_cfg(pusht_store, tmp_path / "bad", steps=1, mix_weights=(("droid", 1.0),)))


@pytest.mark.slow
def test_droid_shaped_and_own_arm_sets_in_one_store_train_eval_and_plan_at_5_fps(tiny_encoder, tmp_path,
                                                                                 monkeypatch):
    """The user's mix in miniature, through the CLI and a registry: the DROID-shaped set (15 fps, action-free, its
    3 cameras; stored at 5 fps) and the "own arm" set (10 fps, 2 cameras under other keys, 7-D delta-EEF actions;
    stored at its 10 fps) in one store, trained as one model at `--fps 5` (a model frame is 1 stored frame of the
    first, 2 of the arm, whose 2 steps add up by its action_kind) with the registry's weights 0.95 / 0.05 (the
    realised share
    of 10,000 windows within +-1%), camera slots (3 slots; the arm fills two, its missing one masked) and
    proprioception across the two robots (an 8-D and a 7-D state, each with its own statistics); eval reports
    each source on its own cameras, and the planner searches one 7-D action per model frame and costs a 7-D
    state."""
    from trainer.api import LoadedWorldModel

    runner = CliRunner()

    def ok(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r

    d = tmp_path
    ok("data", "multicam", "--out", d / "droidlike", "--episodes", "4", "--seed", "0", "--action-free",
       "--min-frames", "30", "--max-frames", "36")
    ok("data", "multicam", "--arm", "own", "--out", d / "ownarm", "--episodes", "4", "--seed", "1",
       "--min-frames", "20", "--max-frames", "24")
    registry = d / "registry"
    registry.mkdir()
    ext = "observation.images.exterior"
    (registry / "droidlike.toml").write_text(
        f'repo_id = "local/droidlike"\nroot = "{d / "droidlike"}"\nuse_actions = false\nmix_weight = 0.95\n'
        f'camera_slots = {{ exterior_1 = "{ext}_1_left", exterior_2 = "{ext}_2_left", '
        'wrist = "observation.images.wrist_left" }\n')
    (registry / "ownarm.toml").write_text(
        f'repo_id = "local/ownarm"\nroot = "{d / "ownarm"}"\nmix_weight = 0.05\n'
        'action_kind = ["delta", "delta", "delta", "delta", "delta", "delta", "absolute"]\n'
        'camera_slots = { exterior_1 = "observation.images.front", wrist = "observation.images.wrist" }\n')
    monkeypatch.setenv("WMCTL_REGISTRY", str(registry))
    for name in ("droidlike", "ownarm"):
        ok("ingest", "--dataset", name, "--out", d / f"{name}.parquet", "--val-fraction", "0.3")
    store = d / "mix.zarr"
    common = ["--store", store, "--encoder", tiny_encoder, "--image-size", "64"]
    ok("encode", "--manifest", d / "droidlike.parquet", *common, "--fps", "5")  # every 3rd frame stored
    ok("encode", "--manifest", d / "ownarm.parquet", *common)  # every frame: the model frame spans 2
    reader = TokenReader(store)
    assert [len(reader.source_attrs(s)["cameras"]) for s in ("droidlike", "ownarm")] == [3, 2]
    run = d / "run"
    ok("train", "--store", store, "--preset", "tiny", "--fps", "5", "--out", run, "--steps", "4",
       "--set", "proprio=true")
    saved = json.loads((run / "config.json").read_text())
    assert saved["frameskip"] == 2 and saved["source_frameskip"] == [["droidlike", 1], ["ownarm", 2]]
    assert saved["mix_weights"] == [["droidlike", 0.95], ["ownarm", 0.05]] and len(saved["action_kinds"]) == 7
    cfg = dataclasses.replace(tiny(), store=store, proprio=True, fps=5.0, frameskip=2, source_frameskip=(
        ("droidlike", 1), ("ownarm", 2)), mix_weights=tuple((s, w) for s, w in saved["mix_weights"]))
    draws = [x for st in range(100) for x in WindowSampler(reader, cfg).global_batch(st, 100)]
    assert abs(np.mean([x.source == "ownarm" for x in draws]) - 0.05) <= 0.01
    wm = LoadedWorldModel.load(run)
    assert wm.actions.frame_dim == 7 and wm.shape.slots == ("exterior_1", "exterior_2", "wrist")
    assert dict(wm.shape.source_slots) == {"droidlike": (0, 1, 2), "ownarm": (0, 2)}
    assert wm.shape.embodiments == (("8-D state", 8), ("7-D state", 7)) and wm.shape.state_dim == 8
    arm = wm.for_source(reader, "ownarm")
    assert arm.state_dim == 7 and wm.for_source(reader, "droidlike").state_dim == 8
    for src, e in (("droidlike", 0), ("ownarm", 1)):  # each robot's state at its own scale
        st = np.concatenate([reader.episode(int(r), ("state",))["state"] for r in
                             reader.episodes[(reader.episodes.source == src) & (reader.episodes.split == "train")
                                             & (reader.episodes.view == 0)].index])
        assert np.allclose(wm.stats.state_stats(e)[0][: st.shape[1]], st.mean(0), atol=1e-4)
    ep = reader.episode(int(reader.episodes[reader.episodes.source == "ownarm"].index[0]), ("patch", "state"))
    z = arm.normalize(ep["patch"][:2], ep["state"][:2])  # its 2 cameras, its 7-D state in the 8-wide state token
    assert z.shape[1] == 2 * wm.shape.grid[0] * wm.shape.grid[1] + 1
    assert (z[:, -1, 7:] == 0).all() and (z[:, -1, :7] != 0).any()
    ok("eval", "--run", run, "--horizons", "1,2")
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert set(res["per_source"]["actions"]) == {"ownarm"} and set(res["per_source"]["action_free"]) == {"droidlike"}
    assert res["source_cameras"] == {"droidlike": ["exterior_1", "exterior_2", "wrist"],
                                     "ownarm": ["exterior_1", "wrist"]}
    assert set(res["conditions"]["actions"][res["model"]]["cameras"]) == {"exterior_1", "wrist"}
    ok("plan", "offline", "--run", run, "--episodes", "1", "--goal-offset", "2")
    plan = json.loads(next((run / "plan").glob("offline_*.json")).read_text())
    assert plan["problems"] >= 1 and all(np.isfinite(r["action_error"]) for r in plan["rows"])


def test_camera_slots_put_robots_with_other_cameras_in_one_model(pusht_store, multicam_manifest, tiny_encoder,
                                                                   tmp_path, monkeypatch):
    """A 1-camera source (pusht-free) and a 3-camera one (multicam) in one store: refused until the registry names
    each camera's role (with the source and the fix in the message); then one model of 3 slots, every batch
    sample's tokens in its source's slots with the rest zero and marked absent, and a short training run on
    the mix. A source naming a slot the model lacks is refused at eval/plan time. With proprioception the two
    robots (2-D and 8-D state) are two embodiments, each with its own state statistics; one embodiment name with
    two widths, and at eval/plan time a robot the model was not trained on, are refused."""
    import shutil

    from trainer.data import PRESENT
    from trainer.sources import source_cameras, source_layout

    store = tmp_path / "mix.zarr"
    shutil.copytree(pusht_store, store)
    run_encode(EncodeConfig(manifest=multicam_manifest, store=store, encoder=str(tiny_encoder),
                            preprocess=Preprocess(height=64, width=64), layout=StoreLayout(episodes_per_segment=4),
                            batch_size=16, threads=1))
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("WMCTL_REGISTRY", str(registry))
    cfg = _cfg(store, tmp_path / "run", steps=3, ckpt_every=100, sources=("pusht-free", "multicam"), proprio=False)
    reader = TokenReader(store)
    with pytest.raises(UserError, match=r"different cameras \(multicam: .*; pusht-free: \['observation.image'\]\).*"
                                        r"camera_slots"):
        token_shape(reader, cfg)
    ext = "observation.images.exterior"
    (registry / "multicam.toml").write_text(
        f'repo_id = "local/multicam"\ncamera_slots = {{ exterior_1 = "{ext}_1_left", exterior_2 = "{ext}_2_left", '
        'wrist = "observation.images.wrist_left" }\n')
    with pytest.raises(UserError, match=r"sources \['pusht-free'\] have no camera_slots"):
        token_shape(reader, cfg)
    (registry / "pusht-free.toml").write_text('repo_id = "local/pusht-free"\ncamera_slots = { top = "obs.image" }\n')
    with pytest.raises(UserError, match=r"source pusht-free: its store camera 'observation.image' has no slot"):
        token_shape(reader, cfg)
    (registry / "pusht-free.toml").write_text(
        'repo_id = "local/pusht-free"\ncamera_slots = { exterior_1 = "observation.image" }\n')
    shape = token_shape(reader, cfg)
    assert shape.slots == ("exterior_1", "exterior_2", "wrist") and shape.cameras == 3
    assert dict(shape.source_slots) == {"multicam": (0, 1, 2), "pusht-free": (0,)}
    stats = compute_stats(reader, cfg, shape)
    batch = StepBatches(reader, cfg, stats, shape, start_step=1, rank=0, world=1).micro_batches(1)[0]
    samples = WindowSampler(reader, cfg).global_batch(1, cfg.batch_size)
    P = shape.grid[0] * shape.grid[1]
    for i, smp in enumerate(samples):
        want = [True, True, True] if smp.source == "multicam" else [True, False, False]
        assert batch[PRESENT][i].tolist() == want, smp.source
        if smp.source == "pusht-free":
            assert batch["z"][i, :, P:].abs().max() == 0 and batch["z"][i, :, :P].abs().max() > 0
    res = run_train(cfg)
    assert res.step == 3 and all(np.isfinite(r["loss"]) for r in res.metrics)
    (registry / "pusht.toml").write_text('repo_id = "local/pusht"\ncamera_slots = { overhead = "observation.image" }\n')
    with pytest.raises(UserError, match=r"source pusht: unknown camera slot\(s\) \['overhead'\].*"
                                        r"\['exterior_1', 'exterior_2', 'wrist'\]"):
        source_cameras(shape, reader, "pusht")
    assert source_cameras(shape, reader, "pusht-free").slots == (0,)
    # proprioception across the two robots (a 2-D and an 8-D state): one embodiment each, its own statistics
    body = dataclasses.replace(cfg, proprio=True)
    shape = token_shape(reader, body)
    assert shape.embodiments == (("8-D state", 8), ("2-D state", 2)) and shape.state_dim == 8
    stats = compute_stats(reader, body, shape)
    free = reader.episodes[(reader.episodes.source == "pusht-free") & (reader.episodes.split == "train")]
    xy = np.concatenate([reader.episode(int(r), ("state",))["state"] for r in free.index])
    assert stats.state_mean.shape == (2, 8) and np.allclose(stats.state_stats(1)[0][:2], xy.mean(0), atol=1e-3)
    batch = StepBatches(reader, body, stats, shape, start_step=1, rank=0, world=1).micro_batches(1)[0]
    for i, smp in enumerate(WindowSampler(reader, body).global_batch(1, body.batch_size)):
        assert int(batch["embodiment"][i]) == (0 if smp.source == "multicam" else 1)
        if smp.source == "pusht-free":
            assert (batch["z"][i, :, -1, 2:] == 0).all()
    (registry / "multicam.toml").write_text((registry / "multicam.toml").read_text() + 'embodiment = "arm"\n')
    (registry / "pusht-free.toml").write_text((registry / "pusht-free.toml").read_text() + 'embodiment = "arm"\n')
    with pytest.raises(UserError, match=r"embodiment 'arm': source pusht-free has a 2-D state, another source of it "
                                        r"8-D"):
        token_shape(reader, body)
    (registry / "pusht.toml").write_text('repo_id = "local/pusht"\ncamera_slots = { wrist = "observation.image" }\n'
                                         'embodiment = "ur5"\n')
    with pytest.raises(UserError, match=r"source pusht: robot 'ur5' \(2-D state\) is not one the model was trained "
                                        r"on \(8-D state \(8-D\), 2-D state \(2-D\)\)"):
        source_layout(shape, reader, "pusht")


def test_context_curriculum_changes_the_window_length(pusht_store, tmp_path):
    cfg = _cfg(pusht_store, tmp_path / "cur", steps=12, context_schedule=((6, 6),), ckpt_every=100)
    rows = run_train(cfg).metrics
    assert [r["context"] for r in rows] == [4] * 5 + [6] * 7


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_loss_curve_exactly(pusht_store, tmp_path):
    steps = 30
    ref = run_train(_cfg(pusht_store, tmp_path / "ref", steps=steps, ckpt_every=10))
    killed = _cfg(pusht_store, tmp_path / "killed", steps=steps, ckpt_every=10)
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed.out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:  # kill between the 2nd checkpoint and the end
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 24:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 20 <= done < steps, f"the kill must land between step 20 and {steps} (at {done})"
    assert latest_checkpoint(killed.out).name == "step-00000020"
    with pytest.raises(UserError, match="pass --resume"):
        run_train(killed)
    res = run_train(killed, resume=True)
    assert res.step == steps
    a, b = _losses(ref.run_dir), _losses(killed.out)
    assert sorted(b) == list(range(1, steps + 1))  # lines after the checkpoint were replaced, none duplicated
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    for name, t in load_weights(ref.last_checkpoint, "model").items():
        torch.testing.assert_close(load_weights(res.last_checkpoint, "model")[name], t, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_stops_cleanly(pusht_store, tmp_path):
    cfg = _cfg(pusht_store, tmp_path / "pre", steps=500, ckpt_every=1000)
    proc = subprocess.Popen(_cli(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cfg.out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "continue with --resume" in err
    ck = latest_checkpoint(cfg.out)
    assert ck is not None and load_state(ck)["step"] == len(metrics.read_text().splitlines())


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_double_batch(pusht_store, tmp_path):
    single = _cfg(pusht_store, tmp_path / "single", steps=8, batch_size=4, ckpt_every=8, eval_every=1000)
    run_train(single)
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29517", "-m", "pipeline.cli", "train", "--store", str(pusht_store), "--preset", "tiny",
                        "--out", str(ddp_out), "--steps", "8", "--batch-size", "2", "--set", "ckpt_every=8",
                        "--set", "eval_every=1000", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(single.out), _losses(ddp_out)
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    wa, wb = load_weights(latest_checkpoint(single.out), "model"), load_weights(latest_checkpoint(ddp_out), "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4)


def test_nan_loss_stops_before_the_optimizer_step_and_keeps_checkpoints(pusht_store, tmp_path, monkeypatch):
    import trainer.loop as loop

    cfg = _cfg(pusht_store, tmp_path / "nan", steps=20, ckpt_every=5)
    real = loop.compute_loss

    def poisoned(model, batch, cfg_, step, **kw):
        loss, aux = real(model, batch, cfg_, step, **kw)
        if step == 12:
            loss = loss * float("nan")
            aux = {**aux, "loss": aux["loss"] * float("nan")}
        return loss, aux

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss at step 12"):
        run_train(cfg)
    ck = latest_checkpoint(cfg.out)
    assert ck.name == "step-00000010"
    weights = load_weights(ck, "model")
    assert all(torch.isfinite(t).all() for t in weights.values())
    monkeypatch.setattr(loop, "compute_loss", real)
    res = run_train(cfg, resume=True)  # the last good checkpoint continues
    assert res.step == 20


def test_store_with_another_encoder_is_refused(pusht_store, pusht_manifest, tmp_path):
    run = run_train(_cfg(pusht_store, tmp_path / "r", steps=5, ckpt_every=5))
    other_enc = init_random_dinov3(tmp_path / "enc2", preset="tiny", seed=7)
    other = tmp_path / "other.zarr"
    _encode(pusht_manifest, other, other_enc)
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        run_train(_cfg(other, tmp_path / "r", steps=10), resume=True)
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        run_train(_cfg(other, tmp_path / "ft", steps=5, init_from=run.run_dir))


def test_init_from_starts_at_the_ema_weights_with_a_lower_lr(pusht_store, tmp_path, monkeypatch):
    base = run_train(_cfg(pusht_store, tmp_path / "base", steps=10, ckpt_every=10))
    import trainer.loop as loop

    seen = {}
    real_step = loop.train_step

    def spy(tr, micro, step):
        if step == 1:
            seen["weights"] = {k: v.clone() for k, v in tr.core.state_dict().items()}
        row = real_step(tr, micro, step)
        seen.setdefault("lr", row["lr"])
        return row

    monkeypatch.setattr(loop, "train_step", spy)
    cfg = _cfg(pusht_store, tmp_path / "ft", steps=3, init_from=base.run_dir, finetune_lr_scale=0.1, warmup_steps=1)
    run_train(cfg)
    for k, v in load_weights(base.last_checkpoint, "ema").items():
        torch.testing.assert_close(seen["weights"][k], v)
    assert seen["lr"] == pytest.approx(cfg.lr_at(0) * 0.1)


def test_overrides_parse_types_and_refuse_typos():
    cfg = apply_overrides(tiny(), ["steps=7", "lr=3e-4", "model.softcap=none", "model.merge_2x2=true",
                                   "context_schedule=((10, 8),)", "out=runs/x"])
    assert cfg.steps == 7 and cfg.lr == 3e-4 and cfg.model.softcap is None and cfg.model.merge_2x2
    assert cfg.context_schedule == ((10, 8),) and cfg.out == Path("runs/x")
    with pytest.raises(UserError, match="unknown field"):
        apply_overrides(tiny(), ["step=7"])
    with pytest.raises(UserError, match="model.kmax: unknown field"):
        apply_overrides(tiny(), ["model.kmax=8"])


def test_train_cli(pusht_store, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["train", "--store", str(pusht_store), "--preset", "tiny", "--out", str(out),
                                 "--steps", "3", "--set", "eval_every=3"])
    assert r.exit_code == 0, r.output
    assert "val_loss" in r.output and latest_checkpoint(out).name == "step-00000003"
    again = CliRunner().invoke(app, ["train", "--store", str(pusht_store), "--preset", "tiny", "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_proprio_run_learns_the_state_and_plans_with_it(pusht_store, tmp_path):
    """With proprio on, the agent position is one more latent token: normalised with the run's statistics,
    predicted (validation reports it against copy-last), and rolled out for the planner, where the actions move
    it the way they command: with state-relative targets, a target up-right of the agent ends it up-right.
    (Beating copy-last on the state takes the small preset: 0.25 vs 0.41 on the demo store, see README.)"""
    from trainer.api import LoadedWorldModel

    cfg = _cfg(pusht_store, tmp_path / "p", steps=200, proprio=True, labelled_fraction=0.5, eval_every=20,
               context_mode="clean_context",
               action_mode="relative_to_state")
    res = run_train(cfg)
    state = load_state(res.last_checkpoint)
    assert state["token_shape"]["state_dim"] == 2 and len(state["stats"]["state_mean"]) == 2
    val = [r for r in res.metrics if "val_state_pred_mse" in r]
    assert len(val) == 10 and all(np.isfinite(r["val_state_pred_mse"]) and r["val_state_copy_mse"] > 0 for r in val)
    wm = LoadedWorldModel.load(res.run_dir)
    w = TokenReader(pusht_store).episode(0, ("patch", "state"))
    with pytest.raises(ValueError, match="pass the states"):
        wm.normalize(w["patch"][:2])
    z = wm.normalize(w["patch"][:2], w["state"][:2])
    assert z.shape == (2, 17, 32)
    # the camera axis is part of the layout, also for one camera: one frame keeps its frame axis, and frames
    # without the camera axis are refused (before, [T, P, Z] was taken as flattened, and [1, P, Z] lost its T)
    assert wm.normalize(w["patch"][:1], w["state"][:1]).shape == (1, 17, 32)
    assert wm.normalize(w["patch"][0], w["state"][0]).shape == (17, 32)
    with pytest.raises(ValueError, match="camera axis included"):
        wm.normalize(w["patch"][:2, 0], w["state"][:2])
    torch.testing.assert_close(wm.state_of(z), torch.as_tensor(w["state"][:2]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(wm.denormalize(z), torch.as_tensor(w["patch"][:2]).flatten(1, 2), rtol=1e-4,
                               atol=1e-4)
    lo, hi = wm.actions.bounds()
    acts = torch.as_tensor(np.stack([lo, hi]), dtype=torch.float32)[:, None].expand(2, 3, -1)
    pred = wm.plan_rollout(z, acts, k=1)
    assert pred.shape == (2, 3, 17, 32)
    # eval runs on it: patch errors per horizon, and the probe reads the patches only, never the state token
    from trainer.eval import EvalConfig, run_eval

    ev = run_eval(EvalConfig(ckpt=res.run_dir, horizons=(1, 3), windows_per_episode=2, out=tmp_path / "ev",
                             plots=False, k_sweep=(1,)))
    assert ev.probe is not None and json.dumps(ev.to_json())
    end_lo, end_hi = wm.state_of(pred[0, -1]), wm.state_of(pred[1, -1])
    assert (end_hi - end_lo).min() > 0.5, (end_lo, end_hi)  # px: each coordinate follows its action (tiny model:
    # ~1 px after 200 steps; the small preset on the demo store: ~100 px between the bounds over 3 frames)


def test_early_stopping_stops_after_patience_evals_and_the_run_names_its_best_checkpoint(pusht_store, tmp_path):
    """With a learning rate of 0 the val metric never improves after the first eval: training stops after
    `early_stop_patience` more evals, records the first eval's checkpoint as the best (kept whatever keep_last
    prunes), and a run folder then resolves to it; a resume keeps the count instead of training on."""
    from trainer.checkpoint import BEST_FILE, resolve_checkpoint

    cfg = dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=40, eval_every=2, ckpt_every=100,
                              keep_last=1, lr=0.0, early_stop_patience=2, tracker="none")
    res = run_train(cfg)
    assert res.step == 6  # evals at 2 (the best), 4 and 6 (two without a better one): stop
    best = json.loads((res.run_dir / BEST_FILE).read_text())
    assert best["step"] == 2 and best["metric"] == "val_pred_mse"
    assert resolve_checkpoint(res.run_dir).name == "step-00000002"  # kept although keep_last is 1
    assert json.loads((res.run_dir / "DONE").read_text())["early_stopped"] is True
    with pytest.raises(UserError, match="early_stop_patience"):
        dataclasses.replace(cfg, early_stop_patience=-1)
