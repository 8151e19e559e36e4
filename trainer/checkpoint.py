"""Checkpoints: safetensors for the model and its EMA, plus optimizer state, config and provenance.

A checkpoint is a folder `checkpoints/step-XXXXXXXX/` written under a temporary name, with `COMPLETE`
written last, then renamed into place: a crash leaves the previous checkpoints intact and never a
half-written "latest". `--resume` takes the newest folder that has `COMPLETE`; the last `keep_last` are kept.
Nothing is pickled: tensors go through safetensors (or `torch.load(weights_only=True)` for the optimizer's
tensor dict) and everything else through JSON.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.names import inside, safe_component
from pipeline.stage import UserError, apply_umask, atomic_write_json, fault_point, is_stale, owner_tag

COMPLETE = "COMPLETE"


def _state_dict_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(run_dir: Path, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    optimizer: dict[str, Any], state: dict[str, Any], keep_last: int) -> Path:
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run_dir)
    final = ckdir / f"step-{step:08d}"
    tmp = ckdir / f".step-{step:08d}.{owner_tag()}"
    tmp.mkdir()
    try:
        save_file(_state_dict_cpu(model), tmp / "model.safetensors")
        fault_point("checkpoint-write")
        save_file(_state_dict_cpu(ema), tmp / "ema.safetensors")
        torch.save({"optimizer": optimizer, "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
        atomic_write_json(tmp / "state.json", {**state, "step": step})
        (tmp / COMPLETE).write_text("ok\n")
        apply_umask(tmp, tree=True)  # safetensors writes 0600: teammates sharing a run could not read the weights
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        if final.exists():  # re-saving a step after a resume: replace the old copy
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    best = best_checkpoint(run_dir)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != best:  # early stopping's best is what the run names: never pruned
            shutil.rmtree(old, ignore_errors=True)
    return final


BEST_FILE = "best.json"  # written by early stopping: the checkpoint with the best val metric


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint early stopping recorded as the run's best (None: not recorded, or no longer complete)."""
    try:
        name = json.loads((Path(run_dir) / BEST_FILE).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ckpt = Path(run_dir) / "checkpoints" / safe_component(name, f"checkpoint in {Path(run_dir) / BEST_FILE}")
    return _inside_run(run_dir, ckpt) if (ckpt / COMPLETE).exists() else None


def clean_stale_temporaries(run_dir: Path) -> int:
    """Remove the temporary folders of checkpoint writes whose writer is gone (`pipeline.stage.is_stale`: a write
    killed mid-way leaves gigabytes for `base`)."""
    n = 0
    for p in (Path(run_dir) / "checkpoints").glob(".step-*"):
        tag = p.name.split(".", 2)[2] if p.name.count(".") >= 2 else ""
        if p.is_dir() and is_stale(tag, p):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def complete_checkpoints(run_dir: Path) -> list[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.glob("step-*") if (p / COMPLETE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder; refused when it leads outside the folder (a link)."""
    found = complete_checkpoints(run_dir)
    return _inside_run(run_dir, found[-1]) if found else None


def _inside_run(run_dir: Path, ckpt: Path) -> Path:
    """`ckpt` (found under `run_dir/checkpoints`) if it is a folder of a safe name that stays inside the run."""
    fix = f"a run's checkpoints are folders inside it: move it into {Path(run_dir) / 'checkpoints'} or remove it"
    name = safe_component(ckpt.name, f"checkpoint folder in {Path(run_dir) / 'checkpoints'}", fix)
    try:
        inside(Path(run_dir) / "checkpoints", name, "checkpoint")
    except UserError:
        raise UserError(f"checkpoint {ckpt} leads outside its run folder (to {ckpt.resolve()}); {fix}") from None
    return ckpt


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder: its best checkpoint where early stopping recorded one, else its newest
    complete checkpoint."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    found = best_checkpoint(path) or latest_checkpoint(path)
    if found is None:
        raise UserError(f"{path} holds no complete checkpoint (a run folder has checkpoints/step-*/COMPLETE)")
    return found


def _damaged(path: Path, reason: str) -> UserError:
    return UserError(f"{path} cannot be read ({reason}): the checkpoint {path.parent} is damaged. "
                     f"Remove that folder to resume from the checkpoint before it, or start a new --out")


def _reason(e: Exception) -> str:
    """A loader's error as a reason: its type and first line, never its advice on how to load the file anyway."""
    line = str(e).splitlines()[0][:200] if str(e).strip() else ""
    if "weights_only" in line or "Weights only" in line:
        line = ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def load_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, _reason(e)) from None


def load_weights(ckpt: Path, which: str = "ema") -> dict[str, torch.Tensor]:
    if which not in ("ema", "model"):
        raise ValueError(which)
    path = Path(ckpt) / f"{which}.safetensors"
    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a file that is not one
        raise _damaged(path, _reason(e)) from None
    # Checkpoints of proprio runs before 2026-11-21 carry the state token's prior variance apart; it always
    # equalled `delta_var` (the state is scaled to change per frame like a patch), so it is dropped.
    sd.pop("state_delta_var", None)
    return sd


def load_optimizer(ckpt: Path) -> dict[str, Any]:
    """The optimizer state of a checkpoint (tensors and plain containers only: nothing in the file is run). A file
    that is not one is named, with the fix; torch's advice to load it with `weights_only=False` is never passed on."""
    path = Path(ckpt) / "optim.pt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of a file it did not write
            saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise _damaged(path, "it holds Python objects that are not tensors or plain containers; nothing in it was "
                             "run") from None
    except Exception as e:  # noqa: BLE001 - a truncated or replaced file, whatever torch raises for it
        raise _damaged(path, f"{type(e).__name__}: not a complete torch file") from None
    opt = saved.get("optimizer") if isinstance(saved, dict) else None
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= set(opt):
        raise _damaged(path, "not an optimizer state (no optimizer with state and param_groups)")
    return saved
