"""The numeric precision of training and planning: auto | bf16 | fp32, and what it means on a device."""

from __future__ import annotations

import functools
import logging
from typing import Any

from pipeline.stage import UserError

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose auto, bf16 or fp32")


def uses_bf16(precision: str, device: Any) -> bool:
    """Whether `precision` (auto | bf16 | fp32) runs in bf16 on `device`: auto is bf16 on CUDA, fp32 elsewhere.
    Training (autocast) and planning (the weights cast) read it alike. bf16 asked for on a CPU without bf16
    matrix units is kept (the results are right) with a warning once: torch emulates it there, many times slower."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if bf16 and device.type == "cpu":
        _warn_emulated_bf16()
    return bf16


@functools.cache
def _warn_emulated_bf16() -> None:
    import torch

    from pipeline.machine import native_bf16

    if not native_bf16(torch.device("cpu")):
        logging.getLogger("wmctl").warning(
            "precision bf16 on a CPU without bf16 matrix units (no AVX512-BF16 or AMX): torch emulates it, many "
            "times slower than fp32; pass --precision fp32 (or auto)")
