"""The machine a benchmark ran on, described one way for every benchmark (`wmctl bench ...`)."""

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


def bench_device(name: str):
    """`auto` -> cuda where there is one, else cpu; other names as given."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
