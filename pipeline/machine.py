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
