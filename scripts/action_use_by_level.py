"""Where a shortcut world model uses its actions: the one-step x-prediction error at each signal level the K-step
sampler visits, with the window's actions and with the null action, on the same labelled val windows and the same
noise. A study (not a test), for issue-style questions such as "the patches ignore the actions: at which levels?".

    .venv/bin/python scripts/action_use_by_level.py --runs runs/wm,runs/wm-det [--store demo/tokens.zarr]

For each run and signal level tau (and the sampler's step d = 1/K), every frame after the first is noised to tau
(the clean-context regime: each frame sees clean copies of its predecessors, as a rollout does), and the model's
prediction of the clean frame is scored: patch MSE and state MSE (normalised units), with the actions and with the
null action; "gain" = null minus actions. tau = 0 is a prediction from pure noise: the conditional mean given the
context (and the actions), exactly the deterministic control's task, which is scored alongside at its one level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.reader import TokenReader  # noqa: E402
from pipeline.machine import machine_description  # noqa: E402
from trainer.api import LoadedWorldModel  # noqa: E402
from trainer.eval import EvalConfig, collect_windows  # noqa: E402
from trainer.tokens import split_state  # noqa: E402


def level_errors(wm: LoadedWorldModel, store: Path, levels: list[float], k: int, episodes: int, per_episode: int,
                 draws: int, seed: int) -> dict:
    cfg = wm.cfg
    T = cfg.max_context()
    reader = TokenReader(store)
    ev = EvalConfig(ckpt=Path("."), horizons=(T - T // 2,), episodes=episodes, windows_per_episode=per_episode,
                    probe=False, plots=False, tracker="none")
    wins = collect_windows(reader, wm, ev, T // 2)["labelled"]
    z_parts, a_parts = [], []
    for win in wins:
        view = wm.for_source(reader, win.source)
        tok = win.tokens.reshape(*win.tokens.shape[:2], -1, int(np.prod(view.shape.grid)), win.tokens.shape[-1])
        z_parts.append(view.normalize(tok, win.frame_states))
        a_parts.append(view.frame_actions(view.action_inputs(np.nan_to_num(win.actions), win.states))[:, :T])
    z, acts = torch.cat(z_parts), torch.cat(a_parts)
    W = z.shape[0]
    valid = torch.ones(W, T, dtype=torch.bool)
    valid[:, 0] = False  # no action leads into the first frame
    null = torch.zeros_like(valid)
    net = wm.model
    shape = net.shape
    det = cfg.model.kind == "deterministic"
    rows = []
    for tau in ([0.0] if det else levels):
        acc = {key: [] for key in ("patch_act", "patch_null", "state_act", "state_null")}
        for r in range(draws):
            g = torch.Generator().manual_seed(seed * 1000 + r)
            z0 = torch.randn(z.shape, generator=g)
            eps = torch.randn(z.shape, generator=g)
            tau_BT = torch.full((W, T), tau)
            d_BT = torch.full((W, T), 1.0 if det else 1.0 / k)
            with torch.no_grad():
                if det:  # as its training: zero input at level 0, step 1, predecessors clean
                    x_in, ctx, ctx_tau = torch.zeros_like(z), z, 1.0
                else:
                    x_in = tau * z + (1 - tau) * z0
                    ctx, ctx_tau = (1 - cfg.ctx_noise) * z + cfg.ctx_noise * eps, 1.0 - cfg.ctx_noise
                for name, v in (("act", valid), ("null", null)):
                    pred = net(x_in, tau_BT, d_BT, acts, v, ctx, ctx_tau)
                    patches, state = split_state(pred[:, 1:] - z[:, 1:], shape)
                    acc[f"patch_{name}"].append(float(patches.pow(2).mean()))
                    if state is not None:
                        acc[f"state_{name}"].append(float(state.pow(2).mean()))
        row = {"tau": tau, **{key: float(np.mean(v)) for key, v in acc.items() if v}}
        row["patch_gain"] = row["patch_null"] - row["patch_act"]
        if "state_act" in row:
            row["state_gain"] = row["state_null"] - row["state_act"]
        rows.append(row)
    return {"kind": cfg.model.kind, "windows": W, "frames_scored": T - 1, "levels": rows,
            "copy_last_patch": float(split_state(z[:, 1:] - z[:, :-1], shape)[0].pow(2).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="comma-separated run folders")
    ap.add_argument("--store", default=None, help="token store (default: each run's own)")
    ap.add_argument("--levels", default="0,0.25,0.5,0.75", help="signal levels (the K=4 sampler's: 0,.25,.5,.75)")
    ap.add_argument("--k", type=int, default=4, help="the sampler's steps per frame: d = 1/k")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--windows-per-episode", type=int, default=8)
    ap.add_argument("--draws", type=int, default=4, help="noise draws per level (the same for every run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    levels = [float(x) for x in a.levels.split(",")]
    print(machine_description())
    results = {}
    for run in a.runs.split(","):
        wm = LoadedWorldModel.load(Path(run))
        res = level_errors(wm, Path(a.store) if a.store else wm.store, levels, a.k, a.episodes,
                           a.windows_per_episode, a.draws, a.seed)
        results[run] = res
        print(f"\n{run} ({res['kind']}; {res['windows']} labelled windows x {res['frames_scored']} frames; "
              f"copy-last patch MSE {res['copy_last_patch']:.3f})")
        print(f"{'tau':>5} {'patch act':>10} {'patch null':>10} {'gain':>8} {'state act':>10} {'state null':>10} "
              f"{'gain':>8}")
        for r in res["levels"]:
            st = (f"{r['state_act']:10.4f} {r['state_null']:10.4f} {r['state_gain']:8.4f}" if "state_act" in r
                  else "")
            print(f"{r['tau']:5.2f} {r['patch_act']:10.4f} {r['patch_null']:10.4f} {r['patch_gain']:8.4f} {st}")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": machine_description(), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
