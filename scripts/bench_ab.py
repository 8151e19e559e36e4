"""A/B benchmark: this checkout vs an older commit, side by side on one machine, in one run.

    python scripts/bench_ab.py --old REV [--presets tiny,small] [--device cpu]

Checks REV out into a temporary `git worktree`, then, alternating old and new in fresh processes (the same
venv, each tree first on PYTHONPATH), measures (1) `wmctl bench plan` ms per MPC step per preset at the same
CEM budget and (2) one shortcut-forcing training step on a synthetic batch per preset: wall time and the FLOPs
counted by torch.utils.flop_counter (forward, backward and the bootstrap passes). Prints both, and new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = r'''
import json, sys, time, statistics, dataclasses
import torch
from torch.utils.flop_counter import FlopCounterMode
from trainer.config import preset
try:
    from trainer.objective import compute_loss
    from trainer.model import build_model
    from trainer.tokens import TokenShape
except ImportError:  # the layout before the package redesign
    from trainer.models import build_model, compute_loss
    from trainer.model.dynamics import TokenShape
name, cameras, grid, enc_dim, batch, T, device, repeats, flop_steps = sys.argv[1:10]
cameras, grid, enc_dim, batch, T = int(cameras), int(grid), int(enc_dim), int(batch), int(T)
repeats, flop_steps = int(repeats), int(flop_steps)
dev = torch.device(device)
cfg = dataclasses.replace(preset(name), bootstrap_start=0, batch_size=batch)
shape = TokenShape(cameras=cameras, grid=(grid, grid), enc_dim=enc_dim, action_dim=2 * cfg.frameskip,
                   state_dim=2 if cfg.proprio else 0)
torch.manual_seed(0)
model = build_model(cfg.model, shape).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
N = shape.tokens + (1 if shape.state_dim else 0)
def batch_at(step):
    g = torch.Generator().manual_seed(step)
    z = torch.randn(batch, T, N, enc_dim, generator=g)
    if shape.state_dim:
        z[:, :, -1, shape.state_dim:] = 0
    return {"z": z.to(dev), "actions": torch.randn(batch, T, shape.action_dim, generator=g).to(dev),
            "action_valid": torch.ones(batch, T, dtype=torch.bool, device=dev),
            "labelled": torch.ones(batch, dtype=torch.bool), "sample_ids": torch.arange(step * batch, (step + 1) * batch)}
auto = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
def step(s):
    with auto:
        loss, _ = compute_loss(model, batch_at(s), cfg, 10_000 + s)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
flops = []
for s in range(flop_steps):  # the bootstrap rows are drawn per step: average the count over several steps
    with FlopCounterMode(display=False) as fc:
        step(100 + s)
    flops.append(fc.get_total_flops())
times = []
for s in range(repeats + 1):
    if dev.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(s)
    if dev.type == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"preset": name, "flops_per_step": statistics.fmean(flops), "step_s": statistics.median(times[1:]),
                  "tokens_per_step": batch * T * N}))
'''


def run(tree: Path, args: list[str], code: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "pipeline.cli", *args]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare against (e.g. HEAD~3)")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--step", default="small:1:6:32:16:8,base:3:6:768:8:4",
                   help="training-step cases preset:cameras:grid:enc_dim:batch:frames, comma-separated (base: its "
                        "own batch of 8, a 6x6 grid and 4 frames to fit a CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="old/new plan benchmarks alternated this many times")
    p.add_argument("--flop-steps", type=int, default=8, help="steps the FLOP count is averaged over")
    p.add_argument("--new-precision", default=None, help="also time the new tree's planning at this `--precision` "
                   "(e.g. bf16 on a CPU with AVX512-BF16/AMX), in the same alternation, against the old tree's "
                   "default")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="wmctl-ab-") as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), a.old], check=True)
        try:
            rows = []
            for name in a.presets.split(","):
                plan = ["bench", "plan", "--presets", name, "--samples", str(a.samples), "--iterations",
                        str(a.iterations), "--device", a.device]
                olds, news, news_p = [], [], []
                for _ in range(a.rounds):  # alternated: a noisy machine drifts for both alike
                    olds.append(run(old, plan)["rows"][0])
                    news.append(run(ROOT, plan)["rows"][0])
                    if a.new_precision:
                        news_p.append(run(ROOT, [*plan, "--precision", a.new_precision])["rows"][0])
                o, n = olds[0], news[0]
                rows.append({"what": f"plan {name}: ms per MPC step (median of {a.rounds})",
                             "old": statistics.median(r["ms_per_mpc_step"] for r in olds),
                             "new": statistics.median(r["ms_per_mpc_step"] for r in news)})
                if news_p:
                    rows.append({"what": f"plan {name}: ms per MPC step, new in {news_p[0]['dtype']} (old default)",
                                 "old": rows[-1]["old"],
                                 "new": statistics.median(r["ms_per_mpc_step"] for r in news_p)})
                rows.append({"what": f"plan {name}: model evals per step", "old": o["model_evals_per_step"],
                             "new": n["model_evals_per_step"]})
                if "model_passes_per_iteration" in n:
                    rows.append({"what": f"plan {name}: network passes per CEM iteration (new: counted)",
                                 "old": o.get("model_passes_per_iteration", float("nan")),
                                 "new": n["model_passes_per_iteration"]})
            for case in a.step.split(","):
                name, *rest = case.split(":")
                argv = [name, *rest, a.device, str(a.repeats), str(a.flop_steps)]
                o, n = run(old, argv, STEP), run(ROOT, argv, STEP)
                label = f"train step {name} (C={rest[0]}, grid {rest[1]}, Z={rest[2]}, B={rest[3]}, T={rest[4]})"
                rows.append({"what": f"{label}: GFLOP", "old": o["flops_per_step"] / 1e9,
                             "new": n["flops_per_step"] / 1e9})
                rows.append({"what": f"{label}: s", "old": o["step_s"], "new": n["step_s"]})
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    machine = run(ROOT, ["bench", "plan", "--presets", "tiny", "--samples", "2", "--iterations", "1",
                         "--device", a.device])
    print(f"old {a.old} vs new (working tree), {a.device}; {machine.get('cpu')}, {machine.get('cores')} cores, "
          f"torch threads {machine.get('threads')}{', GPU ' + machine['gpu'] if 'gpu' in machine else ''}")
    print(f"{'figure':70s} {'old':>12s} {'new':>12s} {'new/old':>8s}")
    for r in rows:
        print(f"{r['what']:70s} {r['old']:12.4g} {r['new']:12.4g} {r['new'] / r['old']:8.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
