"""One reading of `--device` for every command (`pipeline.machine.resolve_device`): auto is the GPU where one is
visible, else the CPU; a GPU asked for and not visible is one line and exit 2, before any work."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.machine import DEVICE_HELP, resolve_device
from pipeline.stage import UserError


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_is_the_gpu_where_one_is_visible_else_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" CPU ") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert resolve_device("auto").type == "cuda" and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_gpu_that_is_not_visible_is_refused_naming_the_option_and_the_fix(monkeypatch):
    _gpus(monkeypatch, 0)
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=rf"--device {asked}: this process sees no GPU .*pass --device cpu, or "
                                            "--device auto"):
            resolve_device(asked)
    _gpus(monkeypatch, 2)
    with pytest.raises(UserError, match=r"--gpu cuda:2: this process sees 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2", option="--gpu")
    for wrong in ("gpu", "mps", "cpu:1", "cuda:x"):
        with pytest.raises(UserError, match="choose auto"):
            resolve_device(wrong)


def _commands(run, store, out) -> dict[str, list[str]]:
    """Each command with a --device option, with what it needs to start."""
    return {
        "train": ["train", "--store", str(store), "--preset", "tiny", "--steps", "1", "--out", str(out)],
        "train-proposal": ["train-proposal", "--run", str(run), "--steps", "1"],
        "eval": ["eval", "--run", str(run), "--out", str(out)],
        "plan offline": ["plan", "offline", "--run", str(run), "--out", str(out)],
        "plan sim": ["plan", "sim", "--run", str(run), "--out", str(out)],
        "visualize": ["visualize", "--run", str(run), "--out", str(out / "v.png")],
        "decoder train": ["decoder", "train", "--store", str(store), "--out", str(out)],
        "bench rollout": ["bench", "rollout", "--preset", "tiny"],
        "bench plan": ["bench", "plan", "--presets", "tiny"],
        "bench train": ["bench", "train", "--store", str(store), "--preset", "tiny"],
    }


def test_every_command_refuses_a_gpu_it_cannot_see_in_one_line_before_any_work(monkeypatch, tiny_run, pusht_store,
                                                                               tmp_path):
    _gpus(monkeypatch, 0)
    out = tmp_path / "out"
    for name, args in _commands(tiny_run, pusht_store, out).items():
        r = CliRunner().invoke(app, [*args, "--device", "cuda"])
        assert r.exit_code == 2, (name, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --device cuda: this process sees no GPU"), (name, lines)
        assert "--device cpu" in lines[0] and "--device auto" in lines[0], name
        assert not out.exists(), f"{name} wrote {out} before refusing"
    assert not (tiny_run / "proposal").exists()  # train-proposal writes into the run: nothing before refusing


def test_every_device_option_says_auto_is_its_default(tmp_path):
    named = [args[: 2 if args[0] in ("plan", "decoder", "bench") else 1]
             for args in _commands(tmp_path, tmp_path, tmp_path).values()]
    for name in [*named, ["encode"], ["bench", "encode"], ["robot", "serve"], ["robot", "lerobot-eval"]]:
        r = CliRunner().invoke(app, [*name, "--help"], env={"COLUMNS": "300"})
        assert r.exit_code == 0, (name, r.output)
        assert DEVICE_HELP.split(" | ")[0] in " ".join(r.output.split()), name
        assert "--device" in r.output and ("[default: auto]" in r.output or "default auto" in r.output), name
