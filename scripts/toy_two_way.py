"""Where a deterministic model's mean misleads the planner (issue 38): the toy world with a gate of two-way outcomes
(`trainer.toyworld.Gate`), planned on by the shortcut model scoring a candidate by its expected cost over sampled
futures, and by the deterministic control scoring the cost of its one (mean) prediction.

The task. A move whose destination lies inside the gate (a disk of radius 0.8 around the grid's centre, the goal)
goes through with probability 1/2 (the agent lands where it aimed) and else falls into the pit (a far corner). A
trial starts the agent outside the success radius (1.1 around the goal) with a context of 3 frames; the planner
chooses one move (CEM over a 1-step plan, the latent cost to the goal frame), the move is executed in the true
dynamics (the trial's own coin decides the gate), and the trial succeeds if the agent ends within the success
radius. Stopping at the gate's edge always succeeds; aiming into the gate succeeds half of the time. The mean of
the gate's two outcomes (half an agent at the goal, half in the pit) costs about a quarter of the pit, below the
edge's cost, while the expected cost (half the pit's) is above it: a planner that trusts the mean jumps, one that
averages the cost over samples stops at the edge.

Arms, on the same trials (starts, contexts, coins, CEM seeds): `shortcut` (the shortcut model, the shortcut
study's `action_add` variant, scoring the mean cost over `--draws` sampling-noise draws:
`planner.planners.expected_cost_rollout`), `control` (the deterministic control, `deterministic_add`: the same
backbone trained with MSE, its plain rollout), `shortcut_mean` (the shortcut model scoring the cost of its samples'
mean: the same model, the control's scoring), and the exact answers: `oracle_samples` (true samples, `--draws` of
them) and `oracle_mean` (the true conditional mean: a perfect MSE model). `shortcut_mean` runs with
`--with-shortcut-mean` (it doubles the planning time). Paired exact McNemar p-values
(`planner.results.exact_mcnemar`) for shortcut against control and the oracles against each other.

    .venv/bin/python scripts/toy_two_way.py                                  # the study (its time: results.md)
    .venv/bin/python scripts/toy_two_way.py --quick --out /tmp/toy-two-way   # a smoke run, about a minute

Results go to <out>/two_way.json. The settings below are the study's, fixed before it was run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planner.cem import CEMConfig, cem_plan  # noqa: E402
from planner.core import ActionSpec, latent_cost  # noqa: E402
from planner.planners import expected_cost_rollout  # noqa: E402
from planner.results import exact_mcnemar  # noqa: E402
from trainer.toyworld import DISTRACTOR_AT, NOISE, Gate, ToyWorld, bump, step, write_toy_world  # noqa: E402

GATE = Gate(center=(1.5, 1.5), radius=0.8, through=0.5, trap=(0.0, 3.0))
ACTION_RANGE = 1.5  # one move reaches the goal from every start
SUCCESS_RADIUS = 1.1  # the gate's edge (0.8) is inside it, the pit (2.1 from the goal) far outside
START_MIN = 1.3  # starts at least this far from the goal (a move is needed) and at most this far per axis (one move
# reaches the goal strictly inside the action bounds)
CONTEXT = 3
VARIANTS = {"shortcut": "action_add", "control": "deterministic_add"}  # scripts/shortcut_study.py's variants
PAIRS = [("shortcut", "control"), ("shortcut", "shortcut_mean"), ("oracle_samples", "oracle_mean")]
Problem = Callable[["Trial"], tuple[Callable, Callable]]  # a trial -> (rollout, cost) for the planner


@dataclasses.dataclass(frozen=True)
class Trial:
    start: np.ndarray  # [2] the agent's position at the last context frame
    states: np.ndarray  # [Tc, 2] the context's positions
    actions: np.ndarray  # [Tc, 2] the move into each context frame (the first: none, zeros)
    frames: np.ndarray  # [Tc, P, Z] raw tokens
    coins: np.ndarray  # [H] the gate's draws for the executed moves (shared by every arm)
    seed: int  # the planner's and the sampling noise's seed


def make_trials(world: ToyWorld, n: int, *, horizon: int = 1, seed: int = 0) -> list[Trial]:
    """n trials: a start in the box around the goal, outside START_MIN of it, and a context walked into it."""
    rng, goal = np.random.default_rng(seed), np.asarray(world.gate.center)
    trials = []
    while len(trials) < n:
        start = goal + rng.uniform(-START_MIN, START_MIN, 2)
        if np.linalg.norm(start - goal) < START_MIN:
            continue
        states, actions = [start], [np.zeros(2)]
        while len(states) < CONTEXT:  # walk backwards: a move of the data's distribution, on the grid, not gated
            a = world.action(rng)
            prev = states[0] - a
            if prev.min() >= 0 and prev.max() <= 3 and not world.gate.holds(prev):
                states.insert(0, prev)
                actions.insert(1, a)
        frames = np.stack([world.frame(p, int(rng.integers(2)), rng) for p in states])
        trials.append(Trial(start, np.stack(states), np.stack(actions), frames, rng.random(horizon),
                            seed + 1000 * len(trials)))
    return trials


def model_problem(wm, world: ToyWorld, *, k: int, draws: int, score: str = "expected") -> Problem:
    """A trained model's planning problem: its rollout from the trial's context, the latent cost to the goal frame
    (the world's frame with the agent at the goal), scored over `draws` noise draws by the mean cost ("expected")
    or by the cost of the draws' mean ("mean"); one draw: its one prediction."""
    goal = wm.normalize(world.true_mean(np.asarray(world.gate.center))[None, None])[0]
    cost = latent_cost(goal)

    def problem(trial: Trial):
        ctx = wm.normalize(trial.frames[:, None])
        acts = torch.as_tensor(trial.actions, dtype=torch.float32)
        rollout, plan_cost = expected_cost_rollout(wm, ctx, acts, cost, k=k, seed=trial.seed, draws=draws)
        if score == "mean" and draws > 1:
            return rollout, lambda z, a: cost(z.mean(0), a)
        return rollout, plan_cost

    return problem


def oracle_problem(world: ToyWorld, *, draws: int, score: str, horizon: int = 1) -> Problem:
    """The exact answer as a model: `draws` true samples per candidate ("expected": their mean cost), each draw's
    coins, distractor places and noise drawn once per trial and shared by every candidate of every iteration (as a
    model's noise), or the true conditional mean ("mean": a perfect MSE model). Raw tokens, the cost to the same
    goal frame."""
    goal_frame = world.true_mean(np.asarray(world.gate.center))
    cost = latent_cost(torch.from_numpy(goal_frame))

    def problem(trial: Trial):
        rng = np.random.default_rng(trial.seed)
        coins, where = rng.random((draws, horizon)), rng.integers(2, size=(draws, horizon))
        noise = NOISE * rng.standard_normal((draws, horizon, *goal_frame.shape))

        def rollout(actions_SHA: torch.Tensor) -> torch.Tensor:
            a = actions_SHA.double().numpy()
            S, H, _ = a.shape
            if score == "mean":
                return torch.from_numpy(np.stack([[world.next_mean(trial.start, s[:h + 1]) for h in range(H)]
                                                  for s in a]))
            out = np.empty((draws, S, H, *goal_frame.shape))
            for d in range(draws):
                pos = np.repeat(trial.start[None], S, axis=0)
                for h in range(H):
                    pos = world.move(pos, a[:, h], coins[d, h])
                    out[d, :, h] = world.frame(pos, int(where[d, h]), None) + noise[d, h]
            return torch.from_numpy(out)

        if score == "mean":
            return rollout, cost
        return rollout, lambda z, acts: torch.stack([cost(zd, acts) for zd in z]).mean(0)

    return problem


def run_trials(world: ToyWorld, problems: dict[str, Problem], trials: list[Trial], cem: CEMConfig, *,
               done: dict[str, list[dict]] | None = None, progress: Callable[[dict], None] | None = None) -> dict:
    """Plan each trial with every arm (CEM seeded alike), execute the plan in the true dynamics with the trial's
    coins, and score: per arm the trials and their summary, per pair of `PAIRS` present the paired comparison.
    `done`: the records of the first trials of a stopped run of the same settings (not planned again; planning is
    seeded per trial, so they are what planning them again gives); `progress`: called with the records after each
    trial."""
    spec = ActionSpec((-world.action_range,) * 2, (world.action_range,) * 2)
    per_arm: dict[str, list[dict]] = {name: list((done or {}).get(name, [])) for name in problems}
    skip = min(len(rows) for rows in per_arm.values())
    per_arm = {name: rows[:skip] for name, rows in per_arm.items()}
    for trial in trials[skip:]:
        for name, problem in problems.items():
            t0 = time.monotonic()
            rollout, cost = problem(trial)
            res = cem_plan(rollout, cost, spec, cem, generator=torch.Generator().manual_seed(trial.seed))
            per_arm[name].append({**execute(world, trial, res.actions.double().numpy()), "plan_cost": res.cost,
                                  "seconds": time.monotonic() - t0})
        if progress:
            progress(per_arm)
    arms = {name: summarise(rows) for name, rows in per_arm.items()}
    pairs = {f"{a}_vs_{b}": paired(per_arm[a], per_arm[b]) for a, b in PAIRS if a in per_arm and b in per_arm}
    return {"trials": len(trials), "arms": arms, "pairs": pairs, "per_trial": per_arm}


def execute(world: ToyWorld, trial: Trial, plan_HA: np.ndarray) -> dict:
    """The plan's moves in the true dynamics, the gate decided by the trial's coins: the trial's record."""
    pos = trial.start
    for h, a in enumerate(plan_HA):
        pos = world.move(pos, a, trial.coins[h])
    dist = float(np.linalg.norm(pos - np.asarray(world.gate.center)))
    return {"start": trial.start.tolist(), "action": plan_HA.tolist(), "final": pos.tolist(), "distance": dist,
            "success": dist <= SUCCESS_RADIUS, "aimed_into_gate": bool(world.gate.holds(step(trial.start, plan_HA[0]))),
            "fell": bool(np.allclose(pos, world.gate.trap))}


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    return {"success_rate": sum(r["success"] for r in rows) / n,
            "aimed_into_gate": sum(r["aimed_into_gate"] for r in rows) / n,
            "fell": sum(r["fell"] for r in rows) / n, "mean_distance": float(np.mean([r["distance"] for r in rows])),
            "plan_seconds_p50": float(np.median([r["seconds"] for r in rows]))}


def paired(a: list[dict], b: list[dict]) -> dict:
    """Successes of A and B on the same trials, the trials only one solves, and the exact McNemar p of that split."""
    only_a = sum(x["success"] and not y["success"] for x, y in zip(a, b))
    only_b = sum(y["success"] and not x["success"] for x, y in zip(a, b))
    diff = (sum(x["success"] for x in a) - sum(y["success"] for y in b)) / len(a)
    return {"only_a": only_a, "only_b": only_b, "difference": diff, "mcnemar_p": exact_mcnemar(only_a, only_b)}


def agent_weights(world: ToyWorld, raw_XPZ: np.ndarray) -> np.ndarray:
    """How much of an agent each frame [X, P, Z] holds at the goal and in the pit [X, 2]: least squares on the
    agent blob at each and the distractor at each of its places, over the background."""
    g = world.gate
    cols = [bump(np.asarray(g.center))[:, None] * world.agent, bump(np.asarray(g.trap))[:, None] * world.agent,
            *(bump(d)[:, None] * world.distractor for d in DISTRACTOR_AT)]
    X = np.stack([c.ravel() for c in cols], axis=1)
    y = (np.asarray(raw_XPZ, np.float64) - world.background).reshape(len(raw_XPZ), -1).T
    return np.linalg.lstsq(X, y, rcond=None)[0][:2].T


@torch.no_grad()
def gate_predictions(wm, world: ToyWorld, trials: list[Trial], *, k: int, draws: int) -> dict:
    """What a model predicts for the move to the goal (into the gate) from the trials' contexts: per prediction the
    agent at the goal and in the pit (`agent_weights`; the truth: samples (1, 0) or (0, 1), their mean (1/2, 1/2)),
    and the share of predictions mostly in the pit."""
    draws = draws if wm.sampler else 1
    w = []
    for trial in trials:
        ctx = wm.normalize(trial.frames[:, None])
        acts = torch.as_tensor(trial.actions, dtype=torch.float32)
        rollout, _ = expected_cost_rollout(wm, ctx, acts, lambda z, a: z, k=k, seed=trial.seed, draws=draws)
        aim = torch.as_tensor(np.asarray(world.gate.center) - trial.start, dtype=torch.float32)[None, None]
        z = rollout(aim).reshape(draws, -1, *ctx.shape[1:])[:, -1]  # [D, N, Z] the predicted frame(s)
        w.append(agent_weights(world, wm.denormalize(z).double().numpy()))
    w = np.concatenate(w)
    return {"predictions": len(w), "draws_per_context": draws, "at_goal_mean": float(w[:, 0].mean()),
            "in_pit_mean": float(w[:, 1].mean()), "mostly_in_pit": float((w[:, 1] > w[:, 0]).mean()),
            "at_goal_std": float(w[:, 0].std()), "in_pit_std": float(w[:, 1].std())}


def train(name: str, store: Path, out: Path, *, steps: int, seed: int, reuse: bool, batch_size: int | None = None):
    """The shortcut study's variant `name` trained on `store` (a finished run of the same settings reused with
    `reuse`); (model, the seconds its training steps took: the sum of its logged step times)."""
    from shortcut_study import variant_config

    from trainer.api import LoadedWorldModel
    from trainer.loop import run_train
    from trainer.runs import finished_as

    cfg = variant_config(name, store, out, steps, seed)
    if batch_size:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    run_dir = cfg.out if reuse and finished_as(cfg.out, cfg) else run_train(cfg).run_dir
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return LoadedWorldModel.load(run_dir), sum(r.get("step_time", 0.0) for r in rows)


def prepare_store(out: Path, episodes: int) -> Path:
    """The gated toy world's store in `out` (made once; a folder holding another world is refused)."""
    store, made = out / "toy.zarr", out / "world.json"
    world = {"episodes": episodes, "action_range": ACTION_RANGE, "gate": GATE.to_json()}
    if store.exists():
        if not made.is_file() or json.loads(made.read_text()) != world:
            sys.exit(f"{out} holds another toy world than {world}: give another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_toy_world(store, episodes=episodes, action_range=ACTION_RANGE, gate=GATE)
        made.write_text(json.dumps(world))
    return store


def run(args) -> dict:
    from pipeline.machine import machine_description

    out = Path(args.out)
    store = prepare_store(out, args.episodes)
    world = ToyWorld.make(0, ACTION_RANGE, GATE)
    models, train_seconds = {}, {}
    for arm, variant in VARIANTS.items():
        models[arm], train_seconds[arm] = train(variant, store, out, steps=args.steps, seed=args.seed,
                                                reuse=args.reuse, batch_size=args.batch_size)
    cem = CEMConfig(horizon=1, samples=args.cem_samples, elites=max(2, args.cem_samples // 8),
                    iterations=args.cem_iterations)  # a 2-D search: the oracles find the gate's edge with it
    trials = make_trials(world, args.trials, seed=args.seed)
    problems = {
        "shortcut": model_problem(models["shortcut"], world, k=args.k, draws=args.draws),
        "control": model_problem(models["control"], world, k=args.k, draws=1),
        "oracle_samples": oracle_problem(world, draws=args.draws, score="expected"),
        "oracle_mean": oracle_problem(world, draws=args.draws, score="mean"),
    }
    if args.with_shortcut_mean:  # as long again as the shortcut arm
        problems["shortcut_mean"] = model_problem(models["shortcut"], world, k=args.k, draws=args.draws, score="mean")
    partial = out / "two_way.partial.json"  # the trials so far: a stopped run of the same settings goes on from them
    key = {k: v for k, v in vars(args).items() if k not in ("out", "reuse", "quick")}
    done = json.loads(partial.read_text()) if partial.is_file() else {}
    res = run_trials(world, problems, trials, cem, done=done["per_trial"] if done.get("settings") == key else None,
                     progress=lambda rows: save_progress(partial, key, rows))
    res["plan_seconds"] = sum(r["seconds"] for rows in res["per_trial"].values() for r in rows)
    res["gate_predictions"] = {arm: gate_predictions(wm, world, trials[:args.gate_contexts], k=args.k,
                                                     draws=args.gate_draws) for arm, wm in models.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res.update(machine=machine_description(), commit=commit, train_seconds=train_seconds, variants=VARIANTS,
               cpu_seconds=time.process_time(),
               settings={**{k: v for k, v in vars(args).items() if k != "out"}, "gate": GATE.to_json(),
                         "action_range": ACTION_RANGE, "success_radius": SUCCESS_RADIUS, "start_min": START_MIN,
                         "context": CONTEXT, "cem": dataclasses.asdict(cem)})
    (out / "two_way.json").write_text(json.dumps(res, indent=2))
    report(res)
    return res


def save_progress(path: Path, key: dict, per_arm: dict) -> None:
    path.write_text(json.dumps({"settings": key, "per_trial": per_arm}))
    n = min(len(rows) for rows in per_arm.values())
    if n % 10 == 0:
        rates = ", ".join(f"{name} {sum(r['success'] for r in rows) / n:.2f}" for name, rows in per_arm.items())
        print(f"{n} trials: {rates}", flush=True)


def report(res: dict) -> None:
    train = ", ".join(f"{arm} {s:.0f} s" for arm, s in res["train_seconds"].items())
    print(f"\n{res['trials']} trials; training steps {train}; planning {res['plan_seconds']:.0f} s "
          f"(process CPU {res['cpu_seconds']:.0f} s)")
    print("  arm             success  aimed into gate  fell  mean distance  plan p50 s")
    for name, a in res["arms"].items():
        print(f"  {name:<15} {a['success_rate']:7.3f}  {a['aimed_into_gate']:15.3f}  {a['fell']:4.2f}  "
              f"{a['mean_distance']:13.3f}  {a['plan_seconds_p50']:10.3f}")
    for name, p in res["pairs"].items():
        print(f"  {name}: difference {p['difference']:+.3f}, only A {p['only_a']}, only B {p['only_b']}, "
              f"exact McNemar p = {p['mcnemar_p']:.2g}")
    for arm, g in res["gate_predictions"].items():
        print(f"  {arm} at the gate ({g['predictions']} predictions): agent at the goal {g['at_goal_mean']:.2f} "
              f"(std {g['at_goal_std']:.2f}), in the pit {g['in_pit_mean']:.2f} (std {g['in_pit_std']:.2f}); "
              f"mostly in the pit {g['mostly_in_pit']:.2f}")


QUICK = dict(steps=10, episodes=16, trials=4, draws=4, cem_samples=16, cem_iterations=2, batch_size=8,
             gate_contexts=2, gate_draws=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of each model (what a loaded 2-core "
                    "machine gave in the time: 28 min for both; the shortcut study trains 600)")
    ap.add_argument("--episodes", type=int, default=128, help="episodes of 24 frames in the toy store")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default: the study's, 32)")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--draws", type=int, default=8, help="sampling-noise draws a shortcut candidate is scored over")
    ap.add_argument("--k", type=int, default=4, help="shortcut sampling steps per frame")
    ap.add_argument("--cem-samples", type=int, default=32, help="CEM samples per iteration (elites: an eighth)")
    ap.add_argument("--cem-iterations", type=int, default=3)
    ap.add_argument("--with-shortcut-mean", action="store_true", help="also the arm shortcut_mean: the shortcut "
                    "model scored by the cost of its samples' mean")
    ap.add_argument("--gate-contexts", type=int, default=16, help="contexts of the gate-prediction report")
    ap.add_argument("--gate-draws", type=int, default=16, help="samples per context in the gate-prediction report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/toy-two-way")
    ap.add_argument("--reuse", action="store_true", help="reuse finished runs of the same settings in --out")
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    run(args)


if __name__ == "__main__":
    main()
