"""The SLURM job scripts without SLURM: each script's body run with the variables SLURM sets and stubs of srun,
torchrun, wmctl and scontrol on PATH that record how they were called (shard arguments, the rendezvous, the
requeue after a stop signal, the log folder). And the free-space check an encode makes before it starts on a
shared disk (`shutil.disk_usage` faked)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parent.parent / "scripts" / "slurm"
JOBS = ("ingest.sbatch", "encode.sbatch", "train.sbatch")
SEP = "\x1f"

STUB = f"""#!/bin/bash
{{ printf '%s' "$(basename "$0")"; printf '{SEP}%s' "$@"; printf '\\n'; }} >> "$STUB_LOG"
"""
STUBS = {
    # srun: run the command after its options (one task here: the stub does not fan out)
    "srun": STUB + 'while [[ $# -gt 0 && $1 == -* ]]; do shift; done\nexec "$@"\n',
    "torchrun": STUB + """echo "env OMP_NUM_THREADS=$OMP_NUM_THREADS MASTER_ADDR=$MASTER_ADDR" >> "$STUB_LOG"
case "${STUB_TORCHRUN:-ok}" in
  ok) exit 0 ;;
  stop) touch "$STUB_RUN/started"  # like the ranks: run until a PREEMPT file appears, then exit as torchrun does
        for _ in $(seq 600); do [ -e "$STUB_RUN/PREEMPT" ] && exit 1; sleep 0.05; done; exit 9 ;;
  *) exit "$STUB_TORCHRUN" ;;
esac
""",
    "wmctl": STUB + 'exit "${STUB_WMCTL_RC:-0}"\n',
    "scontrol": STUB + 'if [ "$1 $2" = "show hostnames" ]; then printf "node01\\nnode02\\n"; fi\n',
    "sbatch": STUB,
}


@pytest.fixture
def cluster(tmp_path):
    """Run a job script as SLURM would start it: (script, args, env) -> (process result, recorded calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"

    def env(**slurm: str) -> dict[str, str]:
        return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), "WMCTL": "wmctl",
                "TORCHRUN": "torchrun", "SLURM_JOB_ID": "777", **slurm}

    def calls() -> list[list[str]]:
        return [line.split(SEP) for line in log.read_text().splitlines()] if log.exists() else []

    def run(script: str, *args: str, **slurm: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        log.unlink(missing_ok=True)
        r = subprocess.run(["bash", str(SLURM / script), *args], capture_output=True, text=True, cwd=tmp_path,
                           env=env(**slurm), timeout=60)
        return r, calls()

    run.env, run.calls, run.log = env, calls, log
    return run


def _sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in (SLURM / script).read_text().splitlines()
            if line.startswith("#SBATCH")]


@pytest.mark.parametrize("script", [*JOBS, "submit.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", JOBS)
def test_each_job_is_requeueable_signalled_early_and_appends_to_its_log(script):
    opts = _sbatch_lines(script)
    assert {"--requeue", "--signal=B:USR1@120", "--open-mode=append"} <= set(opts)
    assert any(re.fullmatch(r"--cpus-per-task=\d+", o) for o in opts)
    out = [o for o in opts if o.startswith("--output=")]
    assert len(out) == 1 and out[0].startswith("--output=slurm_logs/")  # the folder submit.sh makes
    body = (SLURM / script).read_text()
    assert re.search(r"^trap .* USR1$", body, re.M) and re.search(r"^trap .* TERM$", body, re.M)


def test_submit_makes_the_log_folder_then_calls_sbatch_unchanged(cluster, tmp_path):
    r = subprocess.run(["bash", str(SLURM / "submit.sh"), "--array=0-3", str(SLURM / "encode.sbatch"), "4", "droid"],
                       capture_output=True, text=True, cwd=tmp_path, env=cluster.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "slurm_logs").is_dir()
    assert cluster.calls() == [["sbatch", "--array=0-3", str(SLURM / "encode.sbatch"), "4", "droid"]]


def test_encode_takes_its_shard_count_from_the_argument_not_the_array(cluster):
    # a relaunch of failed tasks only (--array=3,5): the array's highest index says nothing about N
    r, calls = cluster("encode.sbatch", "64", "droid", "/scratch/t.zarr", "--fps", "5",
                       SLURM_ARRAY_JOB_ID="700", SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MAX="5",
                       SLURM_CPUS_PER_TASK="8")
    assert r.returncode == 0, r.stderr
    srun, wmctl = calls
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
    assert wmctl == ["wmctl", "encode", "--dataset", "droid", "--store", "/scratch/t.zarr", "--shard", "3/64",
                     "--device", "cuda", "--fps", "5"]


@pytest.mark.parametrize("script", ["encode.sbatch", "ingest.sbatch"])
def test_shard_arguments_are_checked_before_anything_runs(cluster, script):
    r, calls = cluster(script, "64", "droid", SLURM_ARRAY_JOB_ID="700", SLURM_ARRAY_TASK_ID="64")
    assert r.returncode == 2 and "array index 64 is not a shard of N=64" in r.stderr and not calls
    r, calls = cluster(script, "droid", "/scratch/t.zarr", SLURM_ARRAY_JOB_ID="700", SLURM_ARRAY_TASK_ID="0")
    assert r.returncode == 2 and "shard count N must be a positive integer, got 'droid'" in r.stderr and not calls
    r, calls = cluster(script, "8", "droid")
    assert r.returncode == 2 and "not an array task: submit with --array=0-7" in r.stderr and not calls
    r, calls = cluster(script, "1", "droid")  # one shard, no array: the whole dataset in one job
    assert r.returncode == 0 and calls[-1][calls[-1].index("--shard") + 1] == "0/1"


def test_ingest_shards_and_counts_failed_episodes_as_done(cluster, monkeypatch):
    r, calls = cluster("ingest.sbatch", "16", "droid", "--video-check", "ends", SLURM_ARRAY_JOB_ID="700",
                       SLURM_ARRAY_TASK_ID="15", STUB_WMCTL_RC="1")
    assert r.returncode == 0, r.stderr  # exit 1: some episodes failed, listed and kept out
    assert calls[-1] == ["wmctl", "ingest", "--dataset", "droid", "--shard", "15/16", "--video-check", "ends"]
    r, _ = cluster("ingest.sbatch", "16", "droid", SLURM_ARRAY_JOB_ID="700", SLURM_ARRAY_TASK_ID="1",
                   STUB_WMCTL_RC="2")
    assert r.returncode == 2


def test_train_launches_one_torchrun_per_node_meeting_at_the_first_node(cluster, tmp_path):
    run = tmp_path / "runs" / "wm"
    r, calls = cluster("train.sbatch", str(run), "/scratch/t.zarr", "--preset", "base", SLURM_NNODES="2",
                       SLURM_JOB_NODELIST="node[01-02]", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="32")
    assert r.returncode == 0, r.stderr
    hosts, srun, torchrun, env = calls
    assert hosts[:3] == ["scontrol", "show", "hostnames"]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks=2", "--ntasks-per-node=1"]
    port = str(20000 + 777 % 20000)
    assert torchrun[:13] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-id", "777",
                             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node01:{port}", "wmctl", "train"]
    assert torchrun[13:] == ["--store", "/scratch/t.zarr", "--out", str(run), "--resume", "--preset", "base"]
    assert env == ["env OMP_NUM_THREADS=8 MASTER_ADDR=node01"]
    assert run.is_dir() and not any(c[:2] == ["scontrol", "requeue"] for c in calls)


def _stopped_by(cluster, tmp_path, sig: signal.Signals) -> tuple[int, list[list[str]], Path]:
    run = tmp_path / "run"
    env = cluster.env(STUB_TORCHRUN="stop", STUB_RUN=str(run), SLURM_GPUS_ON_NODE="2")
    proc = subprocess.Popen(["bash", str(SLURM / "train.sbatch"), str(run), "/scratch/t.zarr"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (run / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not (run / "started").exists():
        proc.kill()
        raise AssertionError(f"the training never started: {proc.communicate()}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, cluster.calls(), run


def test_usr1_before_the_time_limit_drops_preempt_and_requeues(cluster, tmp_path):
    rc, calls, run = _stopped_by(cluster, tmp_path, signal.SIGUSR1)
    assert (run / "PREEMPT").exists()  # what every rank watches: they checkpoint and exit
    assert rc == 0 and calls[-1] == ["scontrol", "requeue", "777"]


def test_sigterm_drops_preempt_and_leaves_the_requeue_to_slurm(cluster, tmp_path):
    rc, calls, run = _stopped_by(cluster, tmp_path, signal.SIGTERM)
    assert (run / "PREEMPT").exists()
    assert rc == 1 and not any(c[:2] == ["scontrol", "requeue"] for c in calls)  # scancel must stay cancelled


def test_a_failed_training_is_not_requeued(cluster, tmp_path):
    r, calls = cluster("train.sbatch", str(tmp_path / "run"), "/scratch/t.zarr", STUB_TORCHRUN="2")
    assert r.returncode == 2 and not any(c[:2] == ["scontrol", "requeue"] for c in calls)


# ------------------------------------------------------------------------------ an encode on a shared disk
def _encode_cfg(manifest, store, encoder, **kw):
    from featurestore.encode import EncodeConfig
    from featurestore.encoders import Preprocess
    from featurestore.store import StoreLayout

    return EncodeConfig(manifest=manifest, store=store, encoder=str(encoder), preprocess=Preprocess(height=64,
                        width=64), layout=StoreLayout(episodes_per_segment=4), batch_size=16, threads=1, **kw)


def test_an_encode_larger_than_the_free_space_is_refused_naming_what_fits(pusht_manifest, tiny_encoder, tmp_path,
                                                                          monkeypatch):
    import pandas as pd

    from featurestore.encode import run_encode
    from featurestore.encode_store import _size
    from featurestore.store import TokenStore, projected_bytes
    from pipeline.stage import UserError

    ok = pd.read_parquet(pusht_manifest).query("status == 'ok'")
    frames = int(ok.length.sum())
    schema = dict(cameras=1, tokens=16, dim=32, action_dim=int(ok.action_dim.max()), state_dim=int(ok.state_dim.max()))
    need = projected_bytes(frames, dtype="float16", **schema)
    free = int(need * 0.7)  # int8 at the full rate fits, and float16 at half the rate
    real = shutil.disk_usage
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        return real(path)._replace(free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    store = tmp_path / "tokens.zarr"
    with pytest.raises(UserError) as e:
        run_encode(_encode_cfg(pusht_manifest, store, tiny_encoder))
    msg = str(e.value)
    assert msg.startswith(f"{store}: the encode of ") and f"({frames:,} frames at float16" in msg
    assert f"has {_size(free)} free" in msg and "--force-space" in msg
    fps = float(re.search(r"it fits at --fps (\S+) \(", msg).group(1))
    assert re.search(rf"--fps {fps * 2:g} --dtype int8 \(", msg)  # the full rate at int8
    assert seen and seen[0] == store.absolute()
    assert not TokenStore.open_existing(store).committed_segments(ok.iloc[0].source)  # nothing encoded
    assert e.value.exit_code == 4  # like a write that met ENOSPC: the machine, not the command, is short

    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["encode", "--manifest", str(pusht_manifest), "--store", str(store), "--encoder", str(tiny_encoder),
            "--image-size", "64", "--episodes-per-segment", "4", "--batch-size", "16", "--threads", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 4 and "no space left on the device" in r.output and "--force-space" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--force-space"])  # encoded anyway (a warning says how short the disk is)
    assert r.exit_code == 0, r.output
    again = run_encode(_encode_cfg(pusht_manifest, store, tiny_encoder, force_space=True))
    assert again.frames == 0 and TokenStore.open_existing(store).committed_segments(ok.iloc[0].source)  # all done
