"""What shortcut forcing learns, against the exact answer: train variants briefly on the toy token world
(`trainer/toyworld.py`: an action-driven agent plus a two-place distractor of known distribution) and print, per
variant and K, the sample-mean MSE, single-sample MSE, energy score and spread (sample variance / true variance),
next to the oracle (true conditional mean and true samples) and the null-action error.

    .venv/bin/python scripts/shortcut_study.py --steps 600                # every variant (time: results.md)
    .venv/bin/python scripts/shortcut_study.py --variants recipe,flow_only --steps 300
    .venv/bin/python scripts/shortcut_study.py --action-range 1.5 --out bench/toy-study-a1.5   # actions decide more

A benchmark-style study (not a test; tests/test_toyworld.py runs a short version with assertions). Same data,
seed and budget for every variant; results also go to <out>/study.json. The time a variant takes: docs/results.md,
2026-11-30, "CPU kernel timings and run times recorded in code comments".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.machine import machine_description  # noqa: E402
from trainer.api import LoadedWorldModel  # noqa: E402
from trainer.config import ModelConfig, TrainConfig  # noqa: E402
from trainer.loop import run_train  # noqa: E402
from trainer.runs import finished_as  # noqa: E402
from trainer.toyworld import ACTION_RANGE, measure, world_of, write_toy_world  # noqa: E402

BASE = TrainConfig(
    model=ModelConfig(dim=64, depth=4, heads=4, kv_heads=2, registers=2, time_every=2, k_max=16),
    context_frames=6, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=0.05, ema_decay=0.99,
    labelled_fraction=1.0, action_dropout=0.25, stats_frames=1024, log_every=50, eval_every=10_000,
    ckpt_every=10_000, val_windows=16, tracker="none",
)

# each variant: what it changes from BASE (clean context, bootstrap on a quarter; `model`: ModelConfig changes)
PLAIN = dict(precondition=False)  # the small preset's recipe: plain x-prediction
VARIANTS: dict[str, dict] = {
    "recipe": dict(context_mode="clean_context", bootstrap_fraction=0.25),
    "flow_only": dict(context_mode="clean_context", bootstrap_fraction=0.0),
    "dreamer4": dict(context_mode="diffusion_forcing", bootstrap_fraction=1.0),
    "no_temporal_prior": dict(context_mode="clean_context", bootstrap_fraction=0.25, model=dict(temporal_prior=False)),
    "no_skip": dict(context_mode="clean_context", bootstrap_fraction=0.25, model=dict(precondition_skip=False)),
    "no_precondition": dict(context_mode="clean_context", bootstrap_fraction=0.25, model=PLAIN),
    "no_precondition_flow_only": dict(context_mode="clean_context", bootstrap_fraction=0.0, model=PLAIN),
    "action_add": dict(context_mode="clean_context", bootstrap_fraction=0.25, model=dict(PLAIN, conditioning="add")),
    # Dreamer 4's ramp loss weight (0.9 tau + 0.1, the recipe's) vs every signal level weighted alike
    "action_add_uniform_weight": dict(context_mode="clean_context", bootstrap_fraction=0.25, loss_weight_floor=1.0,
                                      model=dict(PLAIN, conditioning="add")),
    "action_add_time_every_layer": dict(context_mode="clean_context", bootstrap_fraction=0.25,
                                        model=dict(PLAIN, conditioning="add", time_every=1)),
    "action_add_flow_only": dict(context_mode="clean_context", bootstrap_fraction=0.0,
                                 model=dict(PLAIN, conditioning="add")),
    # the same backbone (plain x-prediction), trained without noise: what the objective alone does
    "deterministic": dict(context_mode="clean_context", ctx_noise=0.0, model=dict(PLAIN, kind="deterministic")),
    "deterministic_add": dict(context_mode="clean_context", ctx_noise=0.0,
                              model=dict(PLAIN, kind="deterministic", conditioning="add")),
    "teacher_forced": dict(model=dict(kind="teacher_forced")),
    "dinowm": dict(model=dict(kind="teacher_forced", conditioning="concat", concat_dim=10)),
}


def variant_config(name: str, store: Path, out: Path, steps: int, seed: int) -> TrainConfig:
    changes = dict(VARIANTS[name])
    model = dataclasses.replace(BASE.model, **changes.pop("model", {}))
    return dataclasses.replace(BASE, store=store, out=out / name, steps=steps, seed=seed, model=model, **changes)


def run(args) -> dict:
    out = Path(args.out)
    store = out / "toy.zarr"
    world = {"episodes": args.episodes, "action_range": args.action_range}
    made = out / "world.json"  # the world this folder's store and runs were made of
    if store.exists():
        have = json.loads(made.read_text()) if made.is_file() else {"episodes": args.episodes, "action_range": ACTION_RANGE}
        if have != world or world_of(store).action_range != args.action_range:
            sys.exit(f"{out} holds the toy world {have}, not {world} (or its store predates the world in its "
                     "identity): give another --out (or the same settings)")
    else:
        write_toy_world(store, episodes=args.episodes, action_range=args.action_range)
        made.write_text(json.dumps(world))
    results = {"machine": machine_description(), "steps": args.steps, **world, "variants": {}}
    for name in args.variants:
        t0 = time.monotonic()
        cfg = variant_config(name, store, out, args.steps, args.seed)
        done = args.reuse and finished_as(cfg.out, cfg)
        wm = LoadedWorldModel.load(cfg.out if done else run_train(cfg).run_dir)  # --reuse: measure a finished run
        ks = (1,) if wm.kind in ("deterministic", "teacher_forced") else tuple(args.ks)
        results["variants"][name] = {**measure(wm, store, samples=args.samples, ks=ks, null_k=args.null_k),
                                     "train_seconds": None if done else time.monotonic() - t0}
        print_variant(name, results["variants"][name])
    (out / "study.json").write_text(json.dumps(results, indent=2))
    return results


def print_variant(name: str, m: dict) -> None:
    took = "reused run" if m["train_seconds"] is None else f"train {m['train_seconds']:.0f} s"
    print(f"\n{name} ({m['windows']} val windows, {m['samples']} samples, {took}; "
          f"true variance {m['true_variance']:.3f})")
    print("  h  K   mse(mean) mse(single) mean(N->inf)  energy  spread | oracle mse  energy | null-action mse (K) "
          "oracle")
    for h, row in m["horizons"].items():
        for k, r in row["k"].items():
            print(f"  {h}  {k:<3} {r['mse']:9.4f} {r['mse_single']:11.4f} {r['mse_mean_inf']:12.4f} {r['energy']:7.4f} "
                  f"{r['spread']:7.2f} | "
                  f"{row['oracle_mse']:10.4f} {row['oracle_energy']:7.4f} | {row['null_mse']:.4f} ({row['null_k']}) "
                  f"{row['oracle_null_mse']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--null-k", type=int, default=4, help="K of the null-action samples (a flow-only model: its "
                    "trained step, k_max)")
    ap.add_argument("--action-range", type=float, default=ACTION_RANGE, help="actions uniform in +- this: how far one "
                    "moves the agent, so how much of the next frame they explain (the null action's floor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/toy-study")
    ap.add_argument("--reuse", action="store_true", help="measure a variant's finished run of the same steps again "
                    "instead of training it anew")
    args = ap.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    args.ks = [int(k) for k in args.ks.split(",")]
    run(args)


if __name__ == "__main__":
    main()
