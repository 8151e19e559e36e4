"""Multi-process training as it runs on GPUs, checked on CPUs: every collective the loop issues is served by the
process group the loop makes on GPUs (an NCCL-only group refuses CPU tensors: `No backend type associated with
device type cpu`), each rank binds the GPU of its local rank, and torchrun or srun launch it.

Run as a script (`torchrun --nproc-per-node 2 tests/test_distributed.py ...`), this file is the training process
of the acceptance test: it trains the `tiny` preset with every torch.distributed collective recorded (its tensors'
device, the backend the GPU group would give that device) and refused, as that group would, when the GPU group has
no backend for the device.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "barrier")
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                      "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single")


# ------------------------------------------------------------------------------ the training process (script)
def _spec_devices(spec: str) -> dict[str, str]:
    """"cpu:gloo,cuda:nccl" -> {"cpu": "gloo", "cuda": "nccl"} (a bare backend name: the devices it serves)."""
    if ":" not in spec:
        return {"cpu": spec, "cuda": spec} if spec == "gloo" else {"cuda": spec}
    return dict(part.split(":") for part in spec.split(","))


def _install_audit(spec: str, log_path: Path) -> None:
    """Wrap torch.distributed's collectives: record each call, and refuse a tensor on a device the GPU group
    `spec` has no backend for, with torch's own words (object collectives and barriers use the group's CPU
    backend when it has one, else its first device's: torch's rule)."""
    import torch
    import torch.distributed as dist

    served = _spec_devices(spec)
    object_device = "cpu" if "cpu" in served else next(iter(served))

    def wrap(name: str, fn):
        def audited(*args, **kwargs):
            if name in OBJECT_COLLECTIVES:
                devices = [object_device]
            else:
                found = [a for a in [*args, *kwargs.values()] if torch.is_tensor(a)]
                found += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
                devices = sorted({t.device.type for t in found})
            row = {"op": name, "devices": devices, "gpu_backends": [served.get(dev) for dev in devices],
                   "group": dist.get_backend_config()}
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for dev in devices:
                if dev not in served:
                    raise RuntimeError(f"No backend type associated with device type {dev}")
            return fn(*args, **kwargs)

        return audited

    for name in (*OBJECT_COLLECTIVES, *TENSOR_COLLECTIVES):
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _train_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--audit", type=Path, required=True)
    p.add_argument("--gpu-spec", default=None, help="the GPU process group to check against (default: the loop's)")
    p.add_argument("--stop-at", type=int, default=0, help="rank 1 asks for a stop (PREEMPT) at this step")
    a = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent.parent))
    from trainer.config import tiny
    from trainer.distributed import backend_for
    from trainer.loop import Preempted, run_train

    rank = int(os.environ["RANK"])
    a.audit.mkdir(parents=True, exist_ok=True)
    _install_audit(a.gpu_spec or backend_for("cuda"), a.audit / f"rank{rank}.jsonl")
    cfg = dataclasses.replace(tiny(), store=a.store, out=a.out, steps=a.steps, batch_size=2, ckpt_every=3,
                              eval_every=1000, device="cpu")

    def on_step(row):
        if rank == 1 and row["step"] == a.stop_at:  # a stop asked on one rank stops every rank
            (a.out / "PREEMPT").touch()

    try:
        run_train(cfg, resume=True, on_step=on_step)
    except Preempted as e:
        print(e, file=sys.stderr)
        return 3
    return 0


# ----------------------------------------------------------------------------------------------- the tests
def _torchrun(store: Path, out: Path, audit: Path, steps: int, *extra: str, port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), str(HERE), "--store", str(store), "--out", str(out), "--steps", str(steps),
                           "--audit", str(audit), *extra], capture_output=True, text=True, env=env, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _audit(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_collectives_fit_the_gpu_group_and_a_stopped_run_resumes(pusht_store, tmp_path):
    import torch

    from trainer.checkpoint import latest_checkpoint, load_state, load_weights
    from trainer.config import tiny
    from trainer.distributed import backend_for
    from trainer.loop import run_train

    single = dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "single", steps=6, batch_size=4,
                                 ckpt_every=3, eval_every=1000)
    run_train(single)
    out, audit = tmp_path / "ddp", tmp_path / "audit"
    first = _torchrun(pusht_store, out, audit, 6, "--stop-at", "2", port=29531)
    # rank 1's stop request stopped both ranks, a rank exits 3, and torchrun then exits 1 (so the job script decides
    # to requeue from its own trap and the run folder, not from torchrun's exit code)
    assert first.returncode == 1 and re.search(r"exitcode\s*:\s*3\b", first.stderr), first.stderr[-3000:]
    assert "stopped at step 2 on request; checkpoint None" not in first.stderr
    assert load_state(latest_checkpoint(out))["step"] == 2 and not (out / "DONE").exists()
    second = _torchrun(pusht_store, out, audit, 6, port=29532)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "DONE").exists()
    a, b = _losses(single.out), _losses(out)
    assert sorted(b) == list(range(1, 7))  # the resumed run wrote steps 3-6 after the stopped one's 1-2
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    wa, wb = load_weights(latest_checkpoint(single.out), "model"), load_weights(latest_checkpoint(out), "model")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-3, atol=1e-4)

    calls = _audit(audit)
    served = _spec_devices(backend_for("cuda"))
    assert {c["op"] for c in calls} >= {"all_reduce", "broadcast_object_list", "barrier"}
    assert all(c["group"] == "cpu:gloo" for c in calls)  # on CPUs the loop makes a gloo group for the CPU
    for c in calls:  # and every collective would be served by the group it makes on GPUs
        assert all(dev in served for dev in c["devices"]), c
    host = [c for c in calls if c["op"] == "all_reduce" and c["devices"] == ["cpu"]]
    # the NaN check, the step's sums and the stop flag: per step, per rank (an NCCL-only group would refuse them)
    assert len(host) >= 3 * 6 * 2 and all(c["gpu_backends"] == ["gloo"] for c in host)


@pytest.mark.slow
def test_the_audit_refuses_what_an_nccl_only_group_refuses(pusht_store, tmp_path):
    """The check above has teeth: against an NCCL-only GPU group (the loop's before) training fails at its first
    host-side all-reduce, as it did on GPUs."""
    r = _torchrun(pusht_store, tmp_path / "nccl-only", tmp_path / "audit", 2, "--gpu-spec", "nccl", port=29533)
    assert r.returncode != 0
    assert "No backend type associated with device type cpu" in r.stderr
    refused = [c for c in _audit(tmp_path / "audit") if c["gpu_backends"] == [None]]
    assert refused and refused[0]["op"] == "all_reduce" and refused[0]["devices"] == ["cpu"]


def test_the_loop_issues_collectives_only_through_trainer_distributed():
    tree = ast.parse((HERE.parent.parent / "trainer" / "loop.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("torch.distributed") for name in imported)


def test_launch_env_from_torchrun_and_srun_but_not_the_batch_shell():
    from trainer.distributed import Launch, launch_env

    assert launch_env({}) is None
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}
    assert launch_env(torchrun) == Launch(5, 8, 1, "torchrun")  # srun torchrun: torchrun's ranks win
    srun = {"SLURM_PROCID": "6", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "2"}
    assert launch_env(srun) == Launch(6, 8, 2, "srun")
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}
    assert launch_env(batch_shell) is None  # `wmctl train` run in the job script itself is one process


class _FakeGroup:
    """torch.distributed and torch.cuda as a GPU node shows them, recording the calls in order."""

    def __init__(self, monkeypatch, gpus: int):
        import torch
        import torch.distributed as dist

        self.calls: list[tuple] = []
        self.up = False
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: self.calls.append(("set_device", i)))
        monkeypatch.setattr(dist, "is_initialized", lambda: self.up)
        monkeypatch.setattr(dist, "init_process_group", self.init)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: self.world)
        monkeypatch.setattr(dist, "get_backend_config", lambda: self.backend)

    def init(self, backend, **kw):
        self.calls.append(("init_process_group", backend, kw))
        self.backend, self.up = backend, True
        self.rank = kw.get("rank", int(os.environ.get("RANK", 0)))
        self.world = kw.get("world_size", int(os.environ.get("WORLD_SIZE", 1)))


def test_each_rank_binds_its_gpu_before_a_gloo_and_nccl_group(monkeypatch):
    from trainer.distributed import init_distributed, rank_device

    fake = _FakeGroup(monkeypatch, gpus=4)
    for k, v in {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(k, v)
    d = init_distributed("auto")
    assert fake.calls == [("set_device", 2), ("init_process_group", "cpu:gloo,cuda:nccl", {})]
    assert (d.rank, d.world, d.local_rank) == (6, 8, 2)
    assert str(rank_device("auto", d)) == str(rank_device("cuda", d)) == "cuda:2"


def test_srun_tasks_rendezvous_at_master_addr(monkeypatch):
    from pipeline.stage import UserError
    from trainer.distributed import init_distributed

    fake = _FakeGroup(monkeypatch, gpus=4)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT is not set: export MASTER_ADDR"):
        init_distributed("cuda")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    monkeypatch.setenv("MASTER_PORT", "29500")
    d = init_distributed("cuda")
    assert fake.calls[-1] == ("init_process_group", "cpu:gloo,cuda:nccl",
                              {"init_method": "env://", "rank": 5, "world_size": 8})
    assert ("set_device", 1) in fake.calls and (d.rank, d.world, d.local_rank) == (5, 8, 1)


def test_more_ranks_than_gpus_on_a_node_is_refused(monkeypatch):
    from pipeline.stage import UserError
    from trainer.distributed import init_distributed

    _FakeGroup(monkeypatch, gpus=2)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match="local rank 3 has no GPU of its own: this node shows 2"):
        init_distributed("cuda")


if __name__ == "__main__":
    sys.exit(_train_main(sys.argv[1:]))
