"""Run folders as the README promises them: one owner at a time, a resumed run trains on what it started with, a
torn metrics line does not block a resume, eval and planning check where they write before computing, damaged or
hand-edited run files are one line naming the file, and nothing read from a run's files leads outside it.

Real training (the `tiny` preset on the synthetic token world), real `wmctl` commands; processes where the item is
about processes (the two-trainings case and the killed owner's lock are in tests/test_faults.py)."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import IDENTITY, write_token_world
from typer.testing import CliRunner

from featurestore.store import StoreLayout, TokenStore
from pipeline.cli import app
from pipeline.stage import UserError, owner_tag
from trainer.checkpoint import latest_checkpoint, load_state
from trainer.runs import RunState

LOCK = "LOCK"  # the run folder's lock file (trainer.runs.LOCK; spelled out so that this file runs on older code)


def _wmctl(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _train(store: Path, run: Path, steps: int, *extra: str):
    return _wmctl("train", "--store", store, "--preset", "tiny", "--out", run, "--steps", str(steps), "--set",
                  "ckpt_every=2", "--set", "eval_every=2", *extra)


def _resume(run: Path, steps: int, *extra: str):
    return _wmctl("train", "--out", run, "--resume", "--steps", str(steps), *extra)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (what a command must leave alone)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained(tmp_path) -> tuple[Path, Path]:
    """A synthetic store and a run of 4 steps on it (checkpoints at 2 and 4)."""
    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    r = _train(store, run, 4)
    assert r.exit_code == 0, r.output
    return store, run


# ----------------------------------------------------------------------------------------- 3: one owner
def _dead_tag() -> str:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}.{int(p.stdout)}.deadbeef"


def test_a_run_folder_held_by_a_live_process_is_refused_naming_it_and_a_dead_owner_s_lock_is_taken_over(tmp_path):
    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    run.mkdir()
    holder = {"owner": owner_tag(), "host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00"}
    (run / LOCK).write_text(json.dumps(holder))  # this test process: alive
    r = _train(store, run, 2)
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert f"{run} is in use by a training process (host {socket.gethostname()}, pid {os.getpid()}" in line
    assert "another --out" in line
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # nothing written: no config.json, no metrics
    assert json.loads((run / LOCK).read_text()) == holder  # and the live owner's lock is left alone
    (run / LOCK).write_text(json.dumps({**holder, "owner": _dead_tag()}))  # its owner is gone
    r = _train(store, run, 2)
    assert r.exit_code == 0, r.output
    assert "took over the lock" in r.output
    assert not (run / LOCK).exists()  # released at the end
    assert [row["step"] for row in _rows(run)] == [1, 2]


def test_a_lock_of_another_host_is_taken_over_only_after_six_hours_untouched(tmp_path):
    from trainer.runs import RunLock

    run = tmp_path / "run"
    run.mkdir()
    holder = {"owner": "node17.4242.0badc0de", "host": "node17", "pid": 4242, "since": "2026-01-01 00:00:00"}
    (run / LOCK).write_text(json.dumps(holder))
    with pytest.raises(UserError, match=r"host node17, pid 4242.*6 h after it was last touched"):
        RunLock.acquire(run)
    old = (run / LOCK).stat().st_mtime - 7 * 3600
    os.utime(run / LOCK, (old, old))
    lock = RunLock.acquire(run)
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK).exists()


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    store = write_token_world(tmp_path / "w.zarr")
    r = _wmctl("train", "--store", store, "--preset", "tiny", "--out", tmp_path / "fresh", "--sources", "nope")
    assert r.exit_code == 2, r.output
    assert not (tmp_path / "fresh").exists()  # the folder made for the lock alone is removed with it


# ---------------------------------------------------------------- 6: a resumed run keeps its episodes
def _two_camera_source(store: Path, source: str, episodes: int = 8, length: int = 24) -> None:
    """Append a labelled source with two cameras (the world's one has one) to `store`."""
    rng = np.random.default_rng(5)
    F, P, Z = episodes * length, 16, IDENTITY["dim"]
    cams = ["observation.images.left", "observation.images.right"]
    st = TokenStore.create_or_open(store, IDENTITY, StoreLayout(episodes_per_segment=episodes))
    st.ensure_source(source, {"source": source, "cameras": cams, "action_dim": 2, "state_dim": 2, "has_actions": True,
                              "fps": 10.0}, fixed_keys=())
    w = st.begin_segment(source, "v0-b000000", frames=F, cameras=2, tokens=P, dim=Z, action_dim=2, state_dim=2)
    w.add(0, rng.standard_normal((F, 2, P, Z)).astype(np.float16), np.zeros((F, 2, Z), np.float16))
    table = [{"episode_index": e, "view": 0, "start": e * length, "length": length, "split": ["train", "val"][e % 2],
              "has_actions": True, "task": "", "augment": None} for e in range(episodes)]
    w.commit(action=rng.uniform(-0.5, 0.5, (F, 2)), action_valid=np.ones(F, bool), state=rng.uniform(0, 3, (F, 2)),
             timestamp=np.tile(np.arange(length) / 10.0, episodes),
             episode_index=np.repeat(np.arange(episodes), length), frame_index=np.tile(np.arange(length), episodes),
             attrs={"source": source, "segment_id": "v0-b000000", "view": 0, "block": 0, "frames": F, "cameras": cams,
                    "episodes": table})


def _mix(run: Path) -> list:
    return json.loads((run / "config.json").read_text())["mix_weights"]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("step_time", "data_wait", "tokens_per_s")} for row in rows]


def test_resume_trains_on_the_episodes_it_started_with_whatever_the_store_gained(tmp_path):
    """A labelled source appended after the start (its own train and val episodes) would change the mix and the val
    set: the resumed run ignores it, says so, and ends exactly where an uninterrupted run on the old store ends.
    (4 steps then 6 equal 6 at once: the tiny preset's learning rate over steps 1-6 does not depend on `steps`.)"""
    ref_store, ref = write_token_world(tmp_path / "ref.zarr"), tmp_path / "ref"
    assert _train(ref_store, ref, 6).exit_code == 0
    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    assert _train(store, run, 4).exit_code == 0
    config = (run / "config.json").read_bytes()
    write_token_world(store, source="later", seed=3)  # new source: 6 train, 2 val episodes
    r = _resume(run, 6)
    assert r.exit_code == 0, r.output
    assert not any("mix_later" in row for row in _rows(run))
    assert _untimed(_rows(run)) == _untimed(_rows(ref))  # losses, val losses, mix: bit for bit
    assert "new source(s) ['later']): ignored" in r.output
    assert _mix(run) == json.loads(config)["mix_weights"] == [["world", 1.0]]  # the mix it started with
    assert load_state(latest_checkpoint(run))["data"] == json.loads((run / "data.json").read_text())
    assert set(json.loads((run / "data.json").read_text())["sources"]) == {"world"}


def test_resume_ignores_a_source_of_other_cameras_appended_since(tmp_path, trained):
    store, run = trained
    config = (run / "config.json").read_bytes()
    _two_camera_source(store, "stereo")
    r = _resume(run, 6)
    assert r.exit_code == 0, r.output
    assert "new source(s) ['stereo']): ignored" in r.output
    assert _mix(run) == json.loads(config)["mix_weights"] == [["world", 1.0]]
    assert [row["step"] for row in _rows(run)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_source_that_is_gone_or_has_fewer_episodes_and_writes_nothing(tmp_path, trained):
    store, run = trained
    before = _files(run)
    shutil.rmtree(store)
    write_token_world(store, episodes=6)  # the same source with 6 of its 8 episodes
    r = _resume(run, 6)
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert "source world changed" in line and "2 of its 8 episodes gone or in another split, e.g. episode 6" in line
    assert "re-encode them into this store" in line and "start a new run" in line
    assert _files(run) == before  # config.json, metrics, checkpoints: nothing rewritten
    shutil.rmtree(store)
    write_token_world(store, source="other")
    r = _resume(run, 6)
    assert r.exit_code == 2, r.output
    assert "source(s) ['world'] the run started with are not in" in _error_lines(r.output)[0]
    assert _files(run) == before


# ------------------------------------------------------------------------------ 10: a torn metrics line
def test_a_torn_last_metrics_line_is_dropped_on_resume_and_said(trained):
    _, run = trained
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # killed in the middle of writing step 5's row
    r = _resume(run, 6)
    assert r.exit_code == 0, r.output
    assert "dropped a torn last line (23 bytes" in r.output
    assert [row["step"] for row in _rows(run)] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_before_the_last_is_one_error_line(trained):
    _, run = trained
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = _resume(run, 6)
    assert r.exit_code == 2, r.output
    [line] = _error_lines(r.output)
    assert "metrics.jsonl: line 2 is not a metrics row" in line


# ------------------------------------------------------------- 11: outputs checked before computing
def _readonly(folder: Path, args: list[str]) -> subprocess.CompletedProcess | None:
    """`wmctl args` with `folder` read-only: chmod for a user, a read-only bind mount in a private mount namespace
    for root (whom chmod does not stop); None where neither can be made."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        try:
            return subprocess.run(cmd, capture_output=True, text=True)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)
    if shutil.which("unshare") is None:
        return None
    f = shlex.quote(str(folder))
    script = f"mount --bind {f} {f} && mount -o remount,bind,ro {f} && touch {f}/.probe 2>/dev/null && exit 97; " \
             f"exec {shlex.join(cmd)}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    return None if r.returncode == 97 or "mount" in r.stderr.split("\n")[0] else r


def test_eval_and_plan_offline_refuse_a_read_only_run_before_computing(trained, tmp_path):
    _, run = trained
    before = _files(run)
    r = _readonly(run, ["eval", "--run", str(run), "--horizons", "1,2", "--context", "2"])
    if r is None:
        pytest.skip("cannot make a read-only folder here (root without unshare/mount); the check itself is tested "
                    "with a patched os.access in the next test")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"the eval output folder {run / 'eval'} is not writable" in r.stderr and "pass --out DIR" in r.stderr
    assert "Traceback" not in r.stderr
    r = _readonly(run, ["plan", "offline", "--run", str(run), "--episodes", "1", "--samples", "8"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"the plan output folder {run / 'plan'} is not writable" in r.stderr and "pass --out DIR" in r.stderr
    assert _files(run) == before


def test_the_writability_check_runs_before_any_compute(trained, tmp_path, monkeypatch):
    _, run = trained
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run and mode & os.W_OK
                        else real(p, mode, **kw))  # the run is read-only
    import trainer.api

    def no_compute(*a, **kw):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(trainer.api.LoadedWorldModel, "load", no_compute)
    r = _wmctl("eval", "--run", run, "--horizons", "1,2")
    assert r.exit_code == 2, r.output
    assert f"the eval output folder {run / 'eval'} is not writable ({run}, where it would be made, is not " \
           "writable): nothing was computed" in _error_lines(r.output)[0]
    r = _wmctl("eval", "--run", run, "--horizons", "1,2", "--out", tmp_path / "e", "--tracker", "tensorboard")
    assert "loaded before" in r.output + str(r.exception)  # --out elsewhere: past the check, to the tripwire
    r = _wmctl("plan", "offline", "--run", run)
    assert r.exit_code == 2 and f"the plan output folder {run / 'plan'} is not writable" in r.output
    from trainer.runs import check_writable

    assert check_writable(tmp_path / "new" / "deeper", "x", "fix") == tmp_path / "new" / "deeper"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        check_writable(tmp_path / "file" / "sub", "the output folder", "fix")


def test_eval_and_plan_offline_with_out_write_nothing_into_the_run(trained, tmp_path):
    _, run = trained
    before = _files(run)
    out = tmp_path / "elsewhere"
    r = _wmctl("eval", "--run", run, "--horizons", "1,2", "--context", "2", "--out", out / "eval", "--tracker",
               "tensorboard")
    assert r.exit_code == 0, r.output
    r = _wmctl("plan", "offline", "--run", run, "--episodes", "1", "--samples", "8", "--iterations", "1",
               "--goal-offset", "2", "--out", out / "plan")
    assert r.exit_code == 0, r.output
    assert _files(run) == before  # eval.json, plots, tracker events, the plan: none in the run
    written = set(_files(out))
    assert {"eval/eval.json", "eval/error_vs_horizon.png", "plan/offline_cem.json"} <= written
    assert any(p.startswith("eval/tensorboard/events.") for p in written)


# --------------------------------------------------------------- 13 and 8: damaged and hand-edited files
def test_a_checkpoint_holding_python_objects_is_named_without_torch_s_advice(trained, tmp_path):
    _, run = trained
    ckpt = latest_checkpoint(run)

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "EXECUTED",))

    for damage in (pickle.dumps({"optimizer": Boom()}), (ckpt / "optim.pt").read_bytes()[:100]):
        (ckpt / "optim.pt").write_bytes(damage)
        r = _resume(run, 6)
        assert r.exit_code == 2, r.output
        [line] = _error_lines(r.output)
        assert f"{ckpt / 'optim.pt'} cannot be read" in line and "Remove that folder" in line
        assert "weights_only" not in r.output and "Re-running" not in r.output and "trust" not in r.output
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize(("key", "value", "said"), [
    (("config", "lr"), "fast", 'config.lr should be a number, found "fast"'),
    (("config", "model", "depth"), 2.5, "config.model.depth should be an integer, found 2.5"),
    (("step",), "4", 'step should be an integer, found "4"'),
    (("token_shape", "grid"), "4x4", 'token_shape.grid should be a list of 2 (an integer, an integer), found "4x4"'),
    (("stats", "token_mean"), "zeros", 'stats.token_mean should be a list of numbers, found "zeros"'),
])
def test_a_hand_edited_state_json_is_one_line_naming_file_key_type_and_value(trained, key, value, said):
    _, run = trained
    path = latest_checkpoint(run) / "state.json"
    d = json.loads(path.read_text())
    target = d
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    path.write_text(json.dumps(d))
    before = _files(run)
    for args in (("train", "--out", run, "--resume", "--steps", "6"), ("eval", "--run", run, "--horizons", "1,2")):
        r = _wmctl(*args)
        assert r.exit_code == 2, (args, r.output)
        [line] = _error_lines(r.output)
        assert f"{path}: {said}" in line and "start a new --out" in line, line
        assert _files(run) == before  # nothing committed lost, nothing rewritten


def test_a_config_json_of_a_run_without_checkpoints_is_checked_too(tmp_path):
    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    assert _train(store, run, 2).exit_code == 0
    shutil.rmtree(run / "checkpoints")
    d = json.loads((run / "config.json").read_text())
    d["model"]["heads"] = "four"
    (run / "config.json").write_text(json.dumps(d))
    r = _resume(run, 4)
    assert r.exit_code == 2, r.output
    assert f'{run / "config.json"}: config.model.heads should be an integer, found "four"' in _error_lines(r.output)[0]


# ------------------------------------------------------------------- 2: nothing read leads outside the run
def test_a_checkpoint_that_leads_outside_its_run_is_refused(trained, tmp_path):
    _, run = trained
    ckpt = latest_checkpoint(run)
    outside = tmp_path / "elsewhere" / ckpt.name
    outside.parent.mkdir()
    shutil.move(ckpt, outside)
    ckpt.symlink_to(outside, target_is_directory=True)
    for args in (("eval", "--run", run, "--horizons", "1,2"), ("train", "--out", run, "--resume", "--steps", "6")):
        r = _wmctl(*args)
        assert r.exit_code == 2, (args, r.output)
        [line] = _error_lines(r.output)
        assert f"checkpoint {ckpt} leads outside its run folder (to {outside})" in line


def test_the_run_folder_a_state_json_names_is_never_used_as_a_place(trained, tmp_path):
    _, run = trained
    path = latest_checkpoint(run) / "state.json"
    d = json.loads(path.read_text())
    d["config"]["out"] = str(tmp_path / "victim")
    path.write_text(json.dumps(d))
    assert RunState.read(run).config.out == run
    r = _resume(run, 6)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "victim").exists()
    assert load_state(latest_checkpoint(run))["config"]["out"] == str(run)
