"""Does the sampler's noise decide the plan? For a trained model, on labelled val windows of its store: the same
S random candidate action sequences are rolled out from the same context under D independent noise draws (the
planner's rollouts: common noise per draw, the context committed once per draw), at each K, and costed against
the goal H frames ahead with the planner's cost. Printed per K:

  rank agreement   mean Spearman correlation of the candidates' costs between two draws (1: the noise never
                   changes the ranking CEM's elites come from)
  top-8 overlap    share of the 8 cheapest candidates of one draw that are among the 8 cheapest of another
  noise / spread   the cost's standard deviation over draws, over its standard deviation over candidates
  ms per rollout   one call (S candidates, H frames)

    .venv/bin/python scripts/plan_noise_study.py --run bench/abl2000/recipe-seed0 --ks 1,2,4 --windows 12

A study (not a test). The candidates are uniform in the action box, as CEM's first iteration draws them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.reader import TokenReader, Window  # noqa: E402
from pipeline.machine import machine_description  # noqa: E402
from planner.core import latent_cost  # noqa: E402
from planner.planners import spec_for  # noqa: E402
from planner.sim import SimConfig  # noqa: E402
from trainer.api import LoadedWorldModel  # noqa: E402


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--windows", type=int, default=12, help="val windows (spread over the labelled val episodes)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=5)
    ap.add_argument("--context", type=int, default=2)
    ap.add_argument("--state-weight", type=float, default=SimConfig.state_weight)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    wm = LoadedWorldModel.load(a.run)
    reader = TokenReader(wm.store)
    fs, H, ctx = wm.actions.frameskip, a.horizon, a.context
    need = (ctx - 1 + H) * fs + 1
    eps = reader.episodes
    eps = eps[(eps.split == "val") & (eps.view == 0) & eps.has_actions & (eps.length >= need)]
    per = -(-a.windows // max(1, len(eps)))  # windows per episode, evenly spaced starts
    windows = [(row, e, int(s0)) for row, e in eps.iterrows()
               for s0 in np.linspace(0, int(e.length) - need, per).round().astype(int)][: a.windows]
    spec = spec_for(wm)
    lo, hi, _ = spec.tensors()
    g = torch.Generator().manual_seed(a.seed)
    ks = [int(k) for k in a.ks.split(",")]
    stats: dict[int, dict[str, list[float]]] = {k: {"rank": [], "top8": [], "noise_spread": [], "ms": []} for k in ks}
    for row, e, s0 in windows:
        view = wm.for_source(reader, str(e.source))
        w = reader.read(Window(int(row), s0, ctx + H, fs), ("patch", "state"))
        raw = reader.read(Window(int(row), s0, need), ("action", "state"))
        z = view.normalize(w["patch"], w["state"])
        steps = view.actions.from_dataset(raw["action"][: need - 1].astype(np.float64), raw["state"][: need - 1])
        acts = torch.as_tensor(view.actions.per_frame(steps), dtype=torch.float32)
        ctx_actions = torch.cat([torch.zeros(1, acts.shape[1]), acts[: ctx - 1]])
        cost = latent_cost(z[-1], frame_weights=torch.ones(H), state_dim=view.state_dim, state_weight=a.state_weight)
        cand = lo + (hi - lo) * torch.rand(a.samples, H, spec.dim, generator=g)
        seeds = [int(s) for s in torch.randint(2**31, (a.draws,), generator=g)]
        for k in ks:
            costs = []
            for s in seeds:
                with torch.no_grad():
                    roll = view.planning_rollout(z[:ctx], context_actions_TA=ctx_actions, k=k, seed=s)
                    t0 = time.perf_counter()
                    lat = roll(cand)
                    stats[k]["ms"].append(1000 * (time.perf_counter() - t0))
                costs.append(cost(lat.float(), cand))
            c = torch.stack(costs)  # [D, S]
            for i, j in itertools.combinations(range(a.draws), 2):
                stats[k]["rank"].append(spearman(c[i], c[j]))
                top_i, top_j = set(c[i].argsort()[:8].tolist()), set(c[j].argsort()[:8].tolist())
                stats[k]["top8"].append(len(top_i & top_j) / 8)
            stats[k]["noise_spread"].append(float(c.std(0).mean() / c.mean(0).std()))
    print(f"{wm.name} on {len(windows)} val windows of {len(eps)} episodes, {a.samples} candidates x {a.draws} noise draws, H={H}, "
          f"context {ctx}; {machine_description()}")
    print(f"{'K':>3} {'rank agreement':>15} {'top-8 overlap':>14} {'noise / spread':>15} {'ms per rollout':>15}")
    out = {}
    for k in ks:
        m = {name: float(np.mean(v)) for name, v in stats[k].items()}
        out[k] = m
        print(f"{k:>3} {m['rank']:>15.3f} {m['top8']:>14.2f} {m['noise_spread']:>15.3f} {m['ms']:>15.0f}")
    if a.out:
        a.out.write_text(json.dumps({"run": str(a.run), "windows": len(windows), "samples": a.samples,
                                     "draws": a.draws, "horizon": H, "by_k": out}, indent=2))


if __name__ == "__main__":
    main()
