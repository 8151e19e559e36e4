"""Ablations of the shortcut world model on the demo's tokens, as one command: train each variant with the
demo's baselines' budget (600 steps; `--steps 2000`: the `small` preset's) and several seeds on the same store,
evaluate every run on the same val windows (eval's seed, 4 samples a window), and print one table: per variant
the sample-mean MSE with the actions and with the null action, the energy score, K=4 against the best K, the
distance of the predicted robot state to the true one (models with proprioception), next to copy-last.

    make demo                                                     # writes demo/tokens.zarr (and the demo's runs)
    .venv/bin/python scripts/demo_ablation.py                     # every variant, seeds 0 and 1 (time: results.md)
    .venv/bin/python scripts/demo_ablation.py --variants token,add --seeds 0,1,2

A study (not a test): finished runs of the same steps and recipe are reused, so an interrupted study resumes where it
stopped. Results also go to <out>/ablation.json (ablation-n<samples>-w<windows>.json for other eval settings). The
time a run takes: docs/results.md, 2026-11-30, "CPU kernel timings and run times recorded in code comments".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.machine import machine_description  # noqa: E402
from trainer.config import train_config  # noqa: E402
from trainer.eval import EvalConfig, mean_prediction_mse, run_eval  # noqa: E402
from trainer.loop import run_train  # noqa: E402
from trainer.runs import finished_as  # noqa: E402

# the demo's baselines (scripts/demo-lib.sh: DINO-WM's structure at the demo's width)
DINOWM_AT_DEMO_WIDTH = ["model.dim=128", "model.heads=4", "model.kv_heads=4", "batch_size=16", "warmup_steps=50",
                        "ema_decay=0.99", "num_workers=1", "frameskip=2", "action_mode=relative_to_state",
                        "proprio=true", "labelled_fraction=0.5"]
# the `small` recipe the earlier variants were measured against (before it took the loss weights below): Dreamer 4's
# ramp over the signal level and the state token's error weighed like all patches together
RAMP = ["loss_weight_floor=0.1", "state_weight=1"]
# each variant: (preset, model kind or None, --set overrides; later ones win)
VARIANTS: dict[str, tuple[str, str | None, list[str]]] = {
    "recipe": ("small", None, []),  # the `small` preset as it is (floor 0.5, state_weight 0.1)
    "token": ("small", None, [*RAMP, "model.conditioning=token"]),  # the action as one token per frame only
    "add": ("small", None, [*RAMP, "model.conditioning=add"]),  # also added to every latent token (the preset's)
    "precondition": ("small", None, [*RAMP, "model.precondition=true"]),  # EDM preconditioning, temporal prior
    "uniform_weight": ("small", None, [*RAMP, "loss_weight_floor=1"]),  # every signal level weighted alike
    "half_weight": ("small", None, [*RAMP, "loss_weight_floor=0.5"]),  # between: w = 0.5 + 0.5 tau
    "no_state": ("small", None, [*RAMP, "proprio=false"]),  # no state token: the patches alone carry the motion
    "light_state": ("small", None, [*RAMP, "state_weight=0.1"]),  # the state token's error a tenth of the patches'
    # the two together: the `small` preset since they were measured
    "half_weight_light_state": ("small", None, [*RAMP, "loss_weight_floor=0.5", "state_weight=0.1"]),
    # the recipe with k_max = the sampler's K: the flow term trains exactly the levels K=4 visits (tau = 0, the
    # conditional mean every generated frame starts from, on a quarter of the flow frames instead of 1/16);
    # measured on two seeds: worse than the recipe at every horizon (docs/results.md, 2026-12-01, the targets)
    "sampler_levels": ("small", None, ["model.k_max=4"]),
    "all_labelled": ("small", None, [*RAMP, "labelled_fraction=1.0"]),  # every window labelled (no null action)
    "more_noise": ("small", None, [*RAMP, "tau_power=2"]),  # signal levels drawn nearer the noise (tau <- tau^2)
    "deterministic": ("small", "deterministic", [*RAMP]),  # the same backbone (add), no noise: the objective's control
    "deterministic_light_state": ("small", "deterministic", [*RAMP, "state_weight=0.1"]),  # the preset's control
    "deterministic_token": ("small", "deterministic", [*RAMP, "model.conditioning=token"]),
    "dinowm": ("dinowm", "teacher_forced", DINOWM_AT_DEMO_WIDTH),
}
HORIZONS = (1, 5, 10, 20)
CONTEXT = 4


def run_variant(name: str, seed: int, args) -> dict:
    preset, kind, sets = VARIANTS[name]
    out = Path(args.out) / f"{name}-seed{seed}"
    cfg = train_config(preset, kind=kind, overrides=[*sets, f"seed={seed}", "tracker=none"], store=Path(args.store),
                       steps=args.steps, out=out)
    t0 = time.monotonic()
    done = finished_as(out, cfg)
    if not done:
        run_train(cfg)
    trained = time.monotonic() - t0
    # the demo eval's context (the shortcut's 8-frame window / 2) for every variant: the same windows for all
    ev = run_eval(EvalConfig(ckpt=out, horizons=HORIZONS, episodes=args.episodes, samples=args.samples, probe=False,
                             plots=False, tracker="none", context=CONTEXT, windows_per_episode=args.windows_per_episode,
                             out=out / f"ablation-eval-n{args.samples}-w{args.windows_per_episode}"))
    cond = ev.conditions
    model = ev.model
    row = {"train_seconds": None if done else trained, "kind": ev.kind, "samples": ev.samples[model],
           "windows": ev.windows}
    for c in ("actions", "null_action", "action_free"):
        if c in cond:
            row[c] = {key: cond[c][model][key] for key in ("mse", "mse_single", "energy", "state_dist")
                      if key in cond[c][model]}
            row[f"{c}_copy_last"] = cond[c]["copy_last"]["mse"]
            if "state_dist" in cond[c]["copy_last"]:
                row[f"{c}_copy_last_state"] = cond[c]["copy_last"]["state_dist"]
    if ev.k_sweep is not None:
        row["k_sweep"] = {"energy": ev.k_sweep.mean_energy, "best_k": ev.k_sweep.best_k,
                          "k4_within_10pct": ev.k_sweep.k_within_10pct_of_best}
    if args.action_effect:
        row["action_effect"] = action_effect(out, args)
    return json.loads(json.dumps(row))  # horizons and K as strings, as in ablation.json


def action_effect(run: Path, args) -> dict:
    """How far the actions move the predicted patch tokens: per K (1, and 4 for a sampler) and horizon, the mean
    squared difference (normalised tokens) between the mean of `samples` rollouts with the episode's actions and
    with the null action, on the labelled val windows, next to how far the true frames move from the last context
    frame. A model whose patches ignore the actions scores 0 (plus, at K > 1, the sample means' variance)."""
    import numpy as np

    from featurestore.reader import TokenReader
    from trainer.api import LoadedWorldModel
    from trainer.eval import collect_windows, sample_set

    wm = LoadedWorldModel.load(run)
    cfg = EvalConfig(ckpt=wm.checkpoint, horizons=HORIZONS, episodes=args.episodes, samples=args.samples,
                     windows_per_episode=args.windows_per_episode, batch_size=64)
    wins = collect_windows(TokenReader(wm.cfg.store), wm, cfg, CONTEXT)["labelled"]
    std = wm.stats.token_std.astype(np.float64)  # predictions and store tokens are patch tokens (no state token)
    out = {}
    for k in (1, 4) if wm.sampler else (1,):
        moved, change = [], []
        for win in wins:
            diff = (sample_set(wm, win, CONTEXT, cfg, use_actions=True, k=k).mean(0)
                    - sample_set(wm, win, CONTEXT, cfg, use_actions=False, k=k).mean(0))
            moved.append((diff / std) ** 2)
            truth = win.tokens[:, [CONTEXT + h - 1 for h in HORIZONS]] - win.tokens[:, CONTEXT - 1][:, None]
            change.append((truth / std) ** 2)
        moved, change = np.concatenate(moved), np.concatenate(change)
        out[k] = {"moved": {h: float(moved[:, j].mean()) for j, h in enumerate(HORIZONS)},
                  "true_change": {h: float(change[:, j].mean()) for j, h in enumerate(HORIZONS)}}
    return out


def fmt(values: list[float]) -> str:
    """mean (+- half the range) over seeds."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f}±{(max(values) - min(values)) / 2:.3f}"


def print_table(results: dict, seeds: list[int]) -> None:
    hs = [str(h) for h in HORIZONS]
    print(f"\nDemo tokens, labelled val windows; mean ± half the range over seeds {seeds}; normalised patch tokens")
    print("MSE of the sample mean with the actions (h=" + "/".join(hs) + ")")
    runs = results["runs"]
    for name in results["variants"]:
        rs = [runs[f"{name}-seed{s}"] for s in seeds if f"{name}-seed{s}" in runs]
        if not rs or "actions" not in rs[0]:
            continue
        act = "  ".join(fmt([r["actions"]["mse"][h] for r in rs]) for h in hs)
        null = "  ".join(fmt([r["null_action"]["mse"][h] for r in rs]) for h in hs)
        gap = "  ".join(fmt([r["null_action"]["mse"][h] - r["actions"]["mse"][h] for r in rs]) for h in hs)
        energy = "  ".join(fmt([r["actions"]["energy"][h] for r in rs]) for h in hs)
        print(f"  {name:<18} actions {act}\n  {'':<18} null    {null}\n  {'':<18} null-act {gap}\n"
              f"  {'':<18} energy  {energy}")
        if rs[0]["samples"] > 1 and "mse_single" in rs[0]["actions"]:
            inf = {c: "  ".join(fmt([mean_prediction_mse(r[c]["mse"][h], r[c]["mse_single"][h], r["samples"])
                                     for r in rs]) for h in hs)
                   for c in ("actions", "null_action")}
            print(f"  {'':<18} mean prediction (N->inf), actions {inf['actions']}; null {inf['null_action']}")
        if "state_dist" in rs[0]["actions"]:
            state = {c: "  ".join(fmt([r[c]["state_dist"][h] for r in rs]) for h in hs)
                     for c in ("actions", "null_action")}
            print(f"  {'':<18} state distance, actions {state['actions']}; null {state['null_action']}")
        if all("action_effect" in r for r in rs):
            for k in rs[0]["action_effect"]:
                moved = "  ".join(fmt([r["action_effect"][k]["moved"][h] for r in rs]) for h in hs)
                print(f"  {'':<18} patches moved by the actions (K={k}) {moved}")
        if "k_sweep" in rs[0]:
            ks = [(r["k_sweep"]["best_k"], r["k_sweep"]["energy"]["4"] / min(r["k_sweep"]["energy"].values()))
                  for r in rs]
            print(f"  {'':<18} best K {[k for k, _ in ks]}, K=4 energy / best: {[round(x, 3) for _, x in ks]}")
    first = next(iter(runs.values()))
    print(f"  {'copy-last':<18} actions " + "  ".join(f"{first['actions_copy_last'][h]:.3f}" for h in hs))
    if "actions_copy_last_state" in first:
        print(f"  {'':<18} state distance (standing still) "
              + "  ".join(f"{first['actions_copy_last_state'][h]:.2f}" for h in hs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="demo/tokens.zarr")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--episodes", type=int, default=8, help="val episodes per condition (the demo's eval: 8)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--windows-per-episode", type=int, default=4, help="eval windows per val episode (eval's: 4)")
    ap.add_argument("--action-effect", action="store_true",
                    help="also how far the actions move each model's predicted patches (mean with vs null action)")
    ap.add_argument("--out", default="bench/demo-ablation")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (Path(args.store) / "zarr.json").exists() and not Path(args.store).is_dir():
        ap.error(f"no token store at {args.store}: run `make demo` first (it writes demo/tokens.zarr) or pass --store")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"machine": machine_description(), "store": args.store, "steps": args.steps, "samples": args.samples,
               "windows_per_episode": args.windows_per_episode, "variants": variants, "seeds": seeds, "runs": {}}
    evals = (args.samples, args.windows_per_episode)  # another eval setting: its own table beside the default's
    path = Path(args.out) / ("ablation.json" if evals == (4, 4) else f"ablation-n{evals[0]}-w{evals[1]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # an earlier invocation's runs on the same store and budget stay in the table
        old = json.loads(path.read_text())
        same = (args.store, args.steps, args.samples, args.windows_per_episode)
        if (old.get("store"), old.get("steps"), old.get("samples", 4), old.get("windows_per_episode", 4)) == same:
            results["runs"] = old["runs"]
            results["variants"] = list(dict.fromkeys([*old["variants"], *variants]))
            results["seeds"] = sorted({*old["seeds"], *seeds})
    for name in variants:
        for seed in seeds:
            results["runs"][f"{name}-seed{seed}"] = run_variant(name, seed, args)
            path.write_text(json.dumps(results, indent=2))
            print(f"{name} seed {seed}: done", flush=True)
    print_table(results, results["seeds"])


if __name__ == "__main__":
    main()
