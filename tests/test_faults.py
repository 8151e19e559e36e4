"""Fault injection: real processes stopped at every phase boundary (`WMCTL_FAULT`, a SIGKILL or SIGTERM the process
sends itself at a named point), then the command the README gives is run again, and the result must equal an
uninterrupted run: the store digest for encode, the manifest for ingest, weights and metrics bit for bit for train.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

pytestmark = pytest.mark.slow


def _run(args: list[str], fault: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
    if fault:
        env["WMCTL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          cwd=cwd)


def store_digest(store: Path) -> str:
    """sha256 of what a reader can see: every source's committed segments (attributes but the commit time, and
    every array's values), in a fixed order; staging and failed groups do not count."""
    h = hashlib.sha256()
    for src in sorted(p for p in (store / "sources").iterdir() if p.is_dir()):
        seg_root = src / "segments"
        for seg in sorted(p for p in seg_root.iterdir() if (p / "zarr.json").is_file()):
            attrs = json.loads((seg / "zarr.json").read_text())["attributes"]["wmctl_segment"]
            attrs.pop("committed_at", None)
            h.update(json.dumps([src.name, seg.name, attrs], sort_keys=True).encode())
            for arr in sorted(p for p in seg.iterdir() if (p / "zarr.json").is_file()):
                h.update(arr.name.encode() + np.ascontiguousarray(zarr.open_array(arr, mode="r")[...]).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def encode_args(pusht_manifest, tiny_encoder):
    def args(store: Path) -> list[str]:
        return ["encode", "--manifest", str(pusht_manifest), "--store", str(store), "--encoder", str(tiny_encoder),
                "--image-size", "64", "--episodes-per-segment", "2", "--batch-size", "16", "--threads", "1"]

    return args


@pytest.fixture(scope="module")
def reference_digest(encode_args, tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "s.zarr"
    assert _run(encode_args(store)).returncode == 0
    return store_digest(store)


@pytest.mark.parametrize("fault", ["store-root", "source-group", "shard-written", "segment-commit:2"])
def test_encode_killed_at_a_phase_boundary_then_rerun_equals_an_uninterrupted_run(fault, encode_args,
                                                                                    reference_digest, tmp_path):
    store = tmp_path / "s.zarr"
    killed = _run(encode_args(store), fault=fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _run(encode_args(store))  # the README's answer to a killed job: run the same command again
    assert again.returncode == 0, again.stderr[-2000:]
    assert store_digest(store) == reference_digest
    assert not [p for p in (store / "sources" / "pusht" / "staging").iterdir() if p.is_dir()]  # debris cleaned


def test_two_writers_racing_on_the_same_segments_commit_each_once(encode_args, reference_digest, tmp_path):
    store = tmp_path / "s.zarr"
    env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", *encode_args(store)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert store_digest(store) == reference_digest


def test_ingest_killed_between_blocks_resumes_to_the_same_manifest(multicam_root, tmp_path):
    code = ("import sys; from pathlib import Path; from pipeline.ingest import run_ingest; "
            "from pipeline.ingest_config import IngestConfig; "
            "run_ingest(IngestConfig(source='multicam', root=Path(sys.argv[1]), repo_id='local/multicam', "
            "out=Path(sys.argv[2]), block_size=2, val_fraction=0.4))")

    def ingest(out: Path, fault: str | None = None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
        if fault:
            env["WMCTL_FAULT"] = fault
        return subprocess.run([sys.executable, "-c", code, str(multicam_root), str(out)], env=env).returncode

    assert ingest(tmp_path / "ref.parquet") == 0
    out = tmp_path / "m.parquet"
    assert ingest(out, fault="ingest-block:2") == -9 and not out.exists()
    assert len(list((tmp_path / "m.parquet.parts").glob("block-*.parquet"))) == 2  # two of three blocks kept
    assert ingest(out) == 0
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(tmp_path / "ref.parquet"))


def _weights(run: Path) -> dict:
    from trainer.checkpoint import latest_checkpoint, load_weights

    ck = latest_checkpoint(run)
    return {"ema": load_weights(ck, "ema"), "model": load_weights(ck, "model"), "step": ck.name}


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fault", ["checkpoint-write:2", "train-step:5", "train-step:5:TERM"])
def test_train_stopped_anywhere_resumes_bit_for_bit_with_the_readme_command(fault, tmp_path):
    """SIGKILL inside the second checkpoint write, SIGKILL after step 5, SIGTERM after step 5 (the loop's clean
    stop: a checkpoint, exit 3; a PREEMPT file takes the same path). Then the README's resume command."""
    from synthetic import write_token_world

    store = write_token_world(tmp_path / "w.zarr")
    base = ["train", "--store", str(store), "--preset", "tiny", "--steps", "8", "--set", "ckpt_every=2"]
    assert _run([*base, "--out", str(tmp_path / "ref")]).returncode == 0
    run = tmp_path / "run"
    stopped = _run([*base, "--out", str(run)], fault=fault)
    assert stopped.returncode == (3 if "TERM" in fault else -9), stopped.stderr[-2000:]
    resumed = _run(["train", "--out", str(run), "--resume"])  # README: `wmctl train --out RUN --resume`
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(run)
    assert a["step"] == b["step"] == "step-00000008"
    for kind in ("ema", "model"):
        for k, v in a[kind].items():
            assert np.array_equal(v.numpy(), b[kind][k].numpy()), (kind, k)
    assert _losses(run) == _losses(tmp_path / "ref")
    assert not list((run / "checkpoints").glob(".step-*"))  # a killed checkpoint write leaves nothing behind


def test_a_preempt_file_stops_after_the_step_and_the_readme_command_resumes_bit_for_bit(tmp_path):
    """The scheduler's way (a `PREEMPT` file in the run folder, written here at step 3 by the step callback)."""
    import dataclasses

    import torch
    from synthetic import write_token_world

    from trainer.config import tiny

    # the resumed half runs in a fresh process: give this one the same thread count (a float sum over other
    # threads differs in the last bit; earlier tests in this process may have set 1 thread)
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(fresh.stdout))
    store = write_token_world(tmp_path / "w.zarr")
    cfg = dataclasses.replace(tiny(), store=store, steps=8, ckpt_every=2)
    try:
        _preempted_then_resumed(cfg, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _preempted_then_resumed(cfg, tmp_path: Path) -> None:
    import dataclasses

    from trainer.loop import Preempted, run_train

    run_train(dataclasses.replace(cfg, out=tmp_path / "ref"))
    run = tmp_path / "run"

    def preempt_at_3(row):
        if row["step"] == 3:
            (run / "PREEMPT").write_text("")

    with pytest.raises(Preempted):
        run_train(dataclasses.replace(cfg, out=run), on_step=preempt_at_3)
    assert (run / "checkpoints" / "step-00000003").is_dir()
    resumed = _run(["train", "--out", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(run)
    for k, v in a["ema"].items():
        assert np.array_equal(v.numpy(), b["ema"][k].numpy()), k
    assert _losses(run) == _losses(tmp_path / "ref")


def _train_args(store: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--store", str(store), "--preset", "tiny", "--out", str(run), "--steps", str(steps), *extra]


def test_two_trainings_on_one_run_folder_the_second_is_refused_naming_the_first(tmp_path):
    """A second `wmctl train --out SAME` while the first trains: exit 2 naming the owner (host, pid); the first goes
    on alone (one row per step in metrics.jsonl, its own checkpoint) and gives the folder back when it stops."""
    import socket
    import time

    from synthetic import write_token_world

    from trainer.checkpoint import latest_checkpoint

    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *_train_args(
        store, run, 100_000, "--set", "ckpt_every=100000", "--set", "eval_every=100000")], env=env, stdout=log,
        stderr=subprocess.STDOUT)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline and not (
                metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        second = _run(_train_args(store, run, 20))
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by a training process (host {socket.gethostname()}, pid {first.pid}" in second.stderr
        (run / "PREEMPT").write_text("")  # the first stops at its next step: a checkpoint, exit 3
        assert first.wait(timeout=300) == 3, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert latest_checkpoint(run).name == f"step-{steps[-1]:08d}"
    assert not (run / "LOCK").exists()


def test_a_lock_left_by_a_killed_training_is_taken_over_by_the_readme_resume(tmp_path):
    from synthetic import write_token_world

    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    killed = _run(_train_args(store, run, 6, "--set", "ckpt_every=2"), fault="train-step:3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    holder = json.loads((run / "LOCK").read_text())  # SIGKILL: no cleanup, the lock stays
    resumed = _run(["train", "--out", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"took over the lock of host {holder['host']}, pid {holder['pid']}" in resumed.stderr
    assert not (run / "LOCK").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ reliability round three: the disk refuses
@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS"])
def test_encode_on_a_disk_that_fills_up_or_turns_read_only_exits_4_keeps_its_segments_and_resumes(
        fault, encode_args, reference_digest, tmp_path, monkeypatch):
    """Half a store encoded (shard 0/2), then the disk fills up (a size-limited tmpfs mounted here as root, else
    ENOSPC injected into the writes) or turns read-only: the full encode exits 4 with one line, the committed
    segments are untouched and no staging is left; once the disk has room (is writable) again the same command
    ends with the store of an uninterrupted run."""
    import contextlib
    import errno
    import functools

    from test_os_errors import can_mount, fill, inject, leftovers, one_error_line, remount, tmpfs, tree_digest
    from typer.testing import CliRunner

    from pipeline.cli import app

    disk, mounted = tmp_path / "disk", can_mount()
    store = disk / "s.zarr"
    with contextlib.ExitStack() as stack:
        if mounted:
            stack.enter_context(tmpfs(disk, 4096))
        else:
            disk.mkdir()
        assert _run([*encode_args(store), "--shard", "0/2"]).returncode == 0
        segments = store / "sources" / "pusht" / "segments"
        before = tree_digest(segments)
        assert len([p for p in segments.iterdir() if p.is_dir()]) == 2
        if mounted and fault == "ENOSPC":
            undo = fill(disk).unlink
        elif mounted:
            remount(disk, "ro")
            undo = functools.partial(remount, disk, "rw")
        else:
            inject(monkeypatch, disk, getattr(errno, fault))
            undo = monkeypatch.undo
        r = _run(encode_args(store)) if mounted else CliRunner().invoke(app, [str(a) for a in encode_args(store)])
        one_error_line(r, 4, "no space left" if fault == "ENOSPC" else "read-only", str(disk))
        assert tree_digest(segments) == before and not leftovers(store)
        undo()
        again = _run(encode_args(store))
        assert again.returncode == 0, again.stderr[-2000:]
        assert store_digest(store) == reference_digest
