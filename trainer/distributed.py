"""Training on several processes: who this process is, its device, the process group and every collective the
training loop issues.

Launch: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`; one node or several with
`--nnodes` and a rendezvous endpoint) or one srun task per GPU (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`,
`SLURM_LOCALID`, with `MASTER_ADDR`/`MASTER_PORT` exported by the job script). Each rank binds its own GPU
(`torch.cuda.set_device(LOCAL_RANK)`) before the group is made, so no two ranks share cuda:0.

The process group on GPUs is `cpu:gloo,cuda:nccl`: gradients (DDP, on the GPU) go over NCCL, while the loop's
host-side collectives (the non-finite-loss check, the step's loss sums, the stop and early-stopping flags, the
objects rank 0 decides: run folder, statistics, episodes) go over gloo. Those values live on the host (they
are read with `.item()` and steer Python control flow), so this costs no extra copy, and a collective is served
whatever device its tensor is on: an NCCL-only group refuses a CPU tensor (`No backend type associated with
device type cpu`), which is what broke multi-GPU training before. Object collectives and barriers then run on
the CPU too (torch picks the group's CPU backend for them): no pickles in GPU memory, no device ids for
barriers. The price is that gloo opens its own TCP connections between nodes: where the default network
interface is the wrong one, set `GLOO_SOCKET_IFNAME` as you would `NCCL_SOCKET_IFNAME`. CPU training uses
`cpu:gloo`. The loop calls torch.distributed only through this module (a test checks it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.machine import resolve_device
from pipeline.stage import UserError

log = logging.getLogger(__name__)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process in the training job: its rank, the number of ranks, its rank on its node (its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """What the launcher told this process (`launch_env`)."""

    rank: int
    world: int
    local_rank: int
    launcher: str  # "torchrun" | "srun"


def launch_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place in a multi-process launch, or None for a plain single process. torchrun's variables
    first (also under `srun torchrun`); else those of an srun task: only inside an srun step (`SLURM_STEP_ID`),
    because the batch script's own shell also has `SLURM_PROCID=0` and the job's `SLURM_NTASKS`."""
    env = os.environ if env is None else env
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
        if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
            world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
            return Launch(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), "srun")
    except ValueError as e:
        raise UserError(f"the launcher's rank variables are not integers ({e}); launch with torchrun or srun "
                        "unchanged") from None
    return None


def backend_for(device_type: str) -> str:
    """The process group's backends for training on `device_type` (see the module's note)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "cpu:gloo"


def init_distributed(device: str) -> Dist:
    """Join the job's process group (a no-op for a single process). `device`: the run's `--device`, checked first
    (`pipeline.machine.resolve_device`: a GPU asked for and not visible is refused before anything is written). On
    GPUs each rank first binds the GPU of its local rank."""
    kind = resolve_device(device).type
    launch = launch_env()
    if launch is None or launch.world == 1:
        return Dist()
    if kind == "cuda":
        _bind_gpu(launch)
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if launch.launcher == "srun":
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
            if missing:
                raise UserError(f"task {launch.rank} of {launch.world} started by srun, but {' and '.join(missing)} "
                                "is not set: export MASTER_ADDR (the first node, `scontrol show hostnames "
                                "\"$SLURM_JOB_NODELIST\" | head -n 1`) and MASTER_PORT before srun, or launch with "
                                "torchrun (scripts/slurm/train.sbatch does)")
            kw = dict(init_method="env://", rank=launch.rank, world_size=launch.world)
        dist.init_process_group(backend=backend_for(kind), **kw)
    d = Dist(dist.get_rank(), dist.get_world_size(), launch.local_rank)
    log.info("rank %d of %d (local rank %d, %s), process group %s", d.rank, d.world, d.local_rank, launch.launcher,
             dist.get_backend_config())
    return d


def _bind_gpu(launch: Launch) -> None:
    visible = torch.cuda.device_count()
    if launch.local_rank >= visible:
        raise UserError(f"local rank {launch.local_rank} has no GPU of its own: this node shows {visible} GPU(s) "
                        "(CUDA_VISIBLE_DEVICES); start as many processes per node as it has GPUs "
                        "(torchrun --nproc-per-node, srun --ntasks-per-node)")
    torch.cuda.set_device(launch.local_rank)


def rank_device(requested: str, d: Dist) -> torch.device:
    """The device this rank trains on (`pipeline.machine.resolve_device`, for this rank): "auto" on a machine with
    GPUs and a bare "cuda" are the GPU of its local rank; an explicit "cuda:N" is taken as given (under several
    ranks every one of them would use it: a warning says so)."""
    device = resolve_device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{d.local_rank}")
    if device.type == "cuda" and d.world > 1:
        log.warning("--device %s: every one of the %d ranks trains on that GPU; pass --device cuda (or auto) to give "
                    "each rank the GPU of its LOCAL_RANK", requested, d.world)
    return device


def wrap_ddp(model: nn.Module, device: torch.device, d: Dist) -> nn.Module:
    """`model` under DistributedDataParallel when there are several ranks (gradients all-reduced on its device)."""
    if d.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's `obj` on every rank (pickled, over the group's CPU backend)."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """`t` reduced in place over the ranks (`op`: sum, max or min); returns it."""
    if d.world > 1:
        dist.all_reduce(t, op=_OPS[op])
    return t


def barrier(d: Dist) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if d.world > 1:
        dist.barrier()
