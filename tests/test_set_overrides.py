"""`--set key=value` on every stage command whose behaviour a config dataclass holds (`pipeline.overrides.apply_set`;
`wmctl train` keeps its own): the value lands in the config the command records (its output's JSON or metadata),
after the explicit options, and an unknown key exits 2 naming it and the known fields, before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.overrides import apply_set
from pipeline.stage import UserError

runner = CliRunner()


def _refused(args: list[str], key: str) -> str:
    r = runner.invoke(app, [*args, "--set", f"{key}=1"])
    assert r.exit_code == 2, r.output
    assert f"--set {key}: unknown field" in r.output and "known: " in r.output, r.output
    return r.output


def test_apply_set_changes_nested_fields_and_names_what_it_refuses():
    from planner.sim import SimConfig

    cfg = apply_set(SimConfig(), ["cem.samples=128", "planner=gd", "seed=3", "cem.samples=96", "out=x/y"],
                    what="plan sim")
    assert (cfg.cem.samples, cfg.planner, cfg.seed, cfg.out) == (96, "gd", 3, Path("x/y"))  # the last one wins
    assert apply_set(cfg, None, what="plan sim") is cfg
    with pytest.raises(UserError, match=r"plan sim --set nope: unknown field; known: .*cem.*state_weight"):
        apply_set(cfg, ["nope=1"], what="plan sim")
    with pytest.raises(UserError, match=r"--set cem.nope: unknown field of cem; known: elites, "):
        apply_set(cfg, ["cem.nope=1"], what="plan sim")
    with pytest.raises(UserError, match=r"--set cem: a group of fields; set one of them: cem.horizon, "):
        apply_set(cfg, ["cem=1"], what="plan sim")
    with pytest.raises(UserError, match=r"--set seed.x: seed has no fields"):
        apply_set(cfg, ["seed.x=1"], what="plan sim")
    with pytest.raises(UserError, match=r"--set cem.samples=many: "):
        apply_set(cfg, ["cem.samples=many"], what="plan sim")
    with pytest.raises(UserError, match=r"--set 'seed': expected key=value"):
        apply_set(cfg, ["seed"], what="plan sim")
    with pytest.raises(UserError, match=r"--set cem.elites=999: "):  # the config's own check, with the key named
        apply_set(cfg, ["cem.elites=999"], what="plan sim")


def test_ingest_set(pusht_root, tmp_path):
    from pipeline.manifest import read_manifest

    out = tmp_path / "m.parquet"
    args = ["ingest", "--root", str(pusht_root), "--out", str(out), "--video-check", "none"]
    r = runner.invoke(app, [*args, "--split-seed", "3", "--set", "split_seed=7", "--set", "tolerance_s=0.001"])
    assert r.exit_code == 0, r.output
    config = read_manifest(out)[1]["config"]
    assert config["split_seed"] == 7 and config["tolerance_s"] == 0.001  # after the explicit option
    _refused([*args, "--out", str(tmp_path / "other.parquet")], "nope")
    assert not (tmp_path / "other.parquet").exists()


def test_encode_set(pusht_manifest, tiny_encoder, tmp_path):
    from featurestore.reader import TokenReader

    store = tmp_path / "s.zarr"
    args = ["encode", "--manifest", str(pusht_manifest), "--store", str(store), "--encoder", str(tiny_encoder),
            "--image-size", "64x64", "--batch-size", "16", "--threads", "1", "--augment-views", "1"]
    _refused(args, "preprocess.nope")
    assert not store.exists()
    r = runner.invoke(app, [*args, "--set", "augment_seed=3", "--set", "layout.episodes_per_segment=4"])
    assert r.exit_code == 0, r.output
    assert TokenReader(store).source_attrs("pusht")["augment"] == {"views": 1, "strength": 0.5, "seed": 3}


def test_eval_set(tiny_run, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--run", str(tiny_run), "--horizons", "1,2", "--samples", "1", "--episodes", "1", "--tracker",
            "none", "--out", str(out), "--set", "probe=false", "--set", "plots=false", "--set", "k_sweep=(1,)"]
    _refused(args, "nope")
    assert not out.exists()
    r = runner.invoke(app, [*args, "--moving-fraction", "0.1", "--set", "moving_fraction=0.25"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "eval.json").read_text())["moving_fraction"] == 0.25


FAST = ["--samples", "8", "--elites", "2", "--iterations", "1"]


def test_plan_offline_set(tiny_run, tmp_path):
    args = ["plan", "offline", "--run", str(tiny_run), "--goal-offset", "2", "--episodes", "1", *FAST, "--out",
            str(tmp_path)]
    _refused(args, "cem.nope")
    assert not (tmp_path / "offline_cem.json").exists()
    r = runner.invoke(app, [*args, "--set", "random_samples=8", "--set", "context=3"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "offline_cem.json").read_text())
    assert res["random_samples"] == 8 and res["context"] == 3


def test_plan_sim_set(tiny_run, tmp_path):
    args = ["plan", "sim", "--run", str(tiny_run), "--episodes", "1", "--goal-offset", "4", "--max-steps", "4",
            "--horizon", "2", "--execute", "1", *FAST, "--out", str(tmp_path / "sim")]
    _refused(args, "nope")
    assert not (tmp_path / "sim").exists()
    r = runner.invoke(app, [*args, "--set", "cem.samples=6", "--set", "state_weight=0.5"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "sim" / "sim.json").read_text())["config"]
    assert config["cem"]["samples"] == 6 and config["state_weight"] == 0.5 and config["cem"]["elites"] == 2


def test_train_proposal_set(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    args = ["train-proposal", "--run", str(run), "--steps", "2", "--horizon", "2", "--batch-size", "4",
            "--save-every", "0", "--set", "val_windows=4"]
    _refused(args, "nope")
    assert not (run / "proposal").exists()
    r = runner.invoke(app, [*args, "--set", "width=8", "--set", "batch_size=2"])
    assert r.exit_code == 0, r.output
    config = json.loads((run / "proposal" / "proposal.json").read_text())["config"]
    assert config["width"] == 8 and config["batch_size"] == 2 and config["val_windows"] == 4


def test_decoder_train_and_visualize_set(tiny_run, pusht_store, tmp_path):
    dec = tmp_path / "decoder"
    args = ["decoder", "train", "--store", str(pusht_store), "--steps", "2", "--max-frames", "24", "--out", str(dec)]
    _refused(args, "nope")
    assert not dec.exists()
    r = runner.invoke(app, [*args, "--set", "width=8", "--set", "batch_size=4"])
    assert r.exit_code == 0, r.output
    config = json.loads((dec / "decoder.json").read_text())["config"]
    assert config["width"] == 8 and config["batch_size"] == 4

    out = tmp_path / "v.png"
    args = ["visualize", "--run", str(tiny_run), "--decoder", str(dec), "--out", str(out), "--horizon", "4"]
    _refused(args, "nope")
    assert not out.exists()
    from PIL import Image

    shown = []
    for extra in (["--set", "horizon=2", "--set", "scale=1"], ["--horizon", "2"]):  # the second at scale 2
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 0, r.output
        shown.append((r.output.split(".png (")[1].split(" frames")[0], Image.open(out).size))
    (frames, small), (frames_2, big) = shown
    assert frames == frames_2 and big[0] > small[0] and big[1] > small[1]  # the same frames, tiles at half size


def test_robot_serve_set(tiny_run):
    args = ["robot", "serve", "--run", str(tiny_run), "--goal-pusht"]
    _refused(args, "serve.nope")
    r = runner.invoke(app, [*args, "--set", "serve.host=0.0.0.0"])  # applied: the server's own check refuses it
    assert r.exit_code == 2 and "pickles" in r.output and "--allow-remote" in r.output, r.output


def test_robot_lerobot_eval_set(tiny_run, tmp_path):
    args = ["robot", "lerobot-eval", "--run", str(tiny_run), "--episodes", "2", "--max-steps", "4", "--horizon", "2",
            "--samples", "8", "--elites", "2", "--iterations", "1", "--out", str(tmp_path)]
    _refused(args, "mpc.cem.nope")
    assert not (tmp_path / "eval_info.json").exists()
    r = runner.invoke(app, [*args, "--set", "episodes=1", "--set", "mpc.cem.samples=4"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "eval_info.json").read_text())
    assert info["episodes"] == 1 and info["lerobot"]["overall"]["n_episodes"] == 1


def test_set_device_is_resolved_like_device(tiny_run, tmp_path):
    """`--set device=...` reaches the config after `--device` was read: it is resolved the same way (plan sim
    records the device itself, never "auto") and a device this process cannot use is refused before any work."""
    import torch

    unusable = f"cuda:{torch.cuda.device_count() + 7}"
    args = ["plan", "sim", "--run", str(tiny_run), "--episodes", "1", "--goal-offset", "4", "--max-steps", "4",
            "--horizon", "2", "--execute", "1", *FAST, "--out", str(tmp_path / "sim")]
    r = runner.invoke(app, [*args, "--set", f"device={unusable}"])
    assert r.exit_code == 2 and f"--set device {unusable}" in r.output, r.output
    assert not (tmp_path / "sim").exists()
    r = runner.invoke(app, [*args, "--device", "cpu", "--set", "device=auto"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "sim" / "sim.json").read_text())["config"]
    assert config["device"] == ("cuda" if torch.cuda.is_available() else "cpu")

    r = runner.invoke(app, ["robot", "serve", "--run", str(tiny_run), "--goal-pusht", "--set", "device=tpu"])
    assert r.exit_code == 2 and "--set device 'tpu'" in r.output, r.output
    out = tmp_path / "le"
    r = runner.invoke(app, ["robot", "lerobot-eval", "--run", str(tiny_run), "--episodes", "1", "--out", str(out),
                            "--set", f"device={unusable}"])
    assert r.exit_code == 2 and f"--set device {unusable}" in r.output, r.output
    assert not (out / "eval_info.json").exists()
