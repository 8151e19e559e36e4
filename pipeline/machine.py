"""The machine a command runs on: the one reading of `--device` (`resolve_device`) for every command, and one
description of the machine (and timing helpers) for every benchmark (`wmctl bench ...`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """cpu model, cores, torch threads and (where present) the first GPU's name."""
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_description() -> str:
    """One line: `<cpu>, <n> cores, torch threads <t>, GPU <name>` (or `no GPU`)."""
    m = machine()
    gpu = f"GPU {m['gpu']}" if "gpu" in m else "no GPU"
    return f"{m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, {gpu}"


def native_bf16(device) -> bool:
    """Whether bf16 runs at native speed on `device`: always on CUDA; on the CPU only with bf16 matrix units
    (AVX512-BF16 or AMX, what oneDNN reports). Elsewhere torch emulates bf16 matmuls: correct, but many times slower
    than fp32 (`wmctl bench plan` on an AVX2-only CPU: docs/results.md, 2026-12-01, "bf16 on a CPU")."""
    import torch

    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: no native bf16 either
        return False


DEVICE_HELP = "auto (CUDA if visible, else CPU) | cpu | cuda | cuda:N."  # every command's --device


def resolve_device(requested: str | None = "auto", option: str = "--device"):
    """What a `--device` value runs on, for every command: "auto" (or None) is CUDA where a GPU is visible, else the
    CPU; "cpu", "cuda" (the current GPU, no index: a rank of a training job takes its local rank's) and "cuda:N" as
    given. A GPU asked for that this process cannot see (none visible, or N past the last) is refused before any work
    (`UserError`, exit 2) naming `option` and the fix."""
    import torch

    from pipeline.stage import UserError

    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UserError(f"{option} {requested!r}: choose auto (CUDA if visible, else CPU), cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise UserError(f"{option} {name}: this process sees no GPU (no CUDA driver or device, a CPU-only torch, "
                        f"or CUDA_VISIBLE_DEVICES empty); pass {option} cpu, or {option} auto (the GPU where there "
                        "is one)")
    if device.index is not None and device.index >= visible:
        raise UserError(f"{option} {name}: this process sees {visible} GPU(s), cuda:0 to cuda:{visible - 1} "
                        f"(CUDA_VISIBLE_DEVICES renumbers them from 0); pass one of those, {option} cuda or "
                        f"{option} auto")
    return device


def with_resolved_device(cfg):
    """`cfg` (a dataclass with a `device` field) with that field resolved (`resolve_device`) and written as the device
    itself (cpu, cuda, cuda:N): for the commands whose `--set` may change it after `--device` was read, so that
    `--set device=auto` runs on, and records, what it resolved to, and a device this process cannot use is refused
    before any work, naming `--set device`."""
    import dataclasses

    return dataclasses.replace(cfg, device=str(resolve_device(cfg.device, option="--set device")))


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one untimed warm-up call (allocator, kernels)."""
    import time

    fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out
