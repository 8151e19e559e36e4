"""What a `plan sim` leaves behind, apart from the closed loop that produces it (`planner.sim`): the typed result
(`SimResult`, sim.json: `to_json` / `from_json`), the trials' records and summaries, the committed sim.json with its
PNG strips (an earlier result of another configuration kept beside it), and the paired comparison of two results
(`compare_sims`, exact McNemar). The partial-trial file a stopped run resumes from: `planner.progress`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.stage import UserError, atomic_output, atomic_write_json, config_differences, read_json, to_jsonable

log = logging.getLogger(__name__)

POLICY_IDS = {"model": 0, "random": 1, "scripted": 2}  # the policies a trial runs under (and their RNG ids)


class TrialStart(Protocol):
    """Which start a trial is (`planner.sim.Trial`): what sim.json keeps of it."""

    episode: int
    start: int
    group: str


@dataclasses.dataclass(frozen=True)
class Latency:
    """Plan latency percentiles in seconds (the latency includes committing the context)."""

    p50: float
    p95: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency | None:
        if not seconds:
            return None
        return cls(float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95)))

    def to_json(self) -> dict[str, float]:
        return {"p50": self.p50, "p95": self.p95}

    @classmethod
    def from_json(cls, d: dict[str, float] | None) -> Latency | None:
        return None if d is None else cls(d["p50"], d["p95"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyResult:
    """One policy's trials (model, random, scripted). `distances`: the simulator's distances to the goal, each as
    `final_<name>` (mean at the end) and `start_<name>` (at the start); sim.json holds them beside the others."""

    success_rate: float | None
    steps_to_success: float | None  # None: no trial succeeded
    distances: dict[str, float]
    smoothness: float | None
    latency_s: Latency | None  # None: no plans (random actions, the scripted controller)
    by_group: dict[str, dict[str, Any]]  # {goal group: {trials, successes, success_rate}}
    per_trial: list[dict[str, Any]]  # `trial_record`s, in trial order
    # env steps per second of the control loop over all trials (simulator, rendering, encoding and planning; the
    # goal's rendering and encoding not counted); None: trials written before the loop was timed
    action_hz: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"success_rate": self.success_rate, "steps_to_success": self.steps_to_success, **self.distances,
                "smoothness": self.smoothness, "latency_s": self.latency_s and self.latency_s.to_json(),
                **({"action_hz": self.action_hz} if self.action_hz is not None else {}),
                "by_group": self.by_group, "per_trial": self.per_trial}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PolicyResult:
        # .get: sim.json files written before by_group existed; partial results built by hand (tests)
        return cls(success_rate=d.get("success_rate"), steps_to_success=d.get("steps_to_success"),
                   distances={k: v for k, v in d.items() if k.startswith(("final_", "start_"))},
                   smoothness=d.get("smoothness"), latency_s=Latency.from_json(d.get("latency_s")),
                   by_group=d.get("by_group", {}), per_trial=d["per_trial"], action_hz=d.get("action_hz"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimResult:
    """A `plan sim` result (sim.json): the configuration (SimConfig as JSON, without `out`), the simulator and its
    settings, and each policy's outcome; `strips`, the PNG strips written beside it."""

    config: dict[str, Any]
    env: str
    cameras: list[str]
    trials: int
    dtype: str | None  # the planning model's dtype (None: written before it was recorded)
    simulator: dict[str, Any] | None = None  # `Simulator.describe()` where the simulator has one
    model: PolicyResult
    random: PolicyResult | None = None
    scripted: PolicyResult | None = None  # the simulator's scripted controller (Meta-World)
    strips: list[str] | None = None
    served: dict[str, Any] | None = None  # `--serve-fps`: the robot's rate, the client's threshold, the server's report

    @property
    def policies(self) -> dict[str, PolicyResult]:
        """The policies run, in sim.json's order: model, random, scripted (where present)."""
        return {p: getattr(self, p) for p in POLICY_IDS if getattr(self, p) is not None}

    def to_json(self) -> dict[str, Any]:
        """sim.json's content, exactly."""
        d: dict[str, Any] = {"config": self.config, "env": self.env, "cameras": self.cameras, "trials": self.trials}
        if self.dtype is not None:
            d["dtype"] = self.dtype
        if self.simulator is not None:
            d["simulator"] = self.simulator
        d.update({p: r.to_json() for p, r in self.policies.items()})
        if self.strips is not None:
            d["strips"] = self.strips
        if self.served is not None:
            d["served"] = self.served
        return to_jsonable(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SimResult:
        pols = {p: PolicyResult.from_json(d[p]) for p in POLICY_IDS if p in d}
        return cls(config=d["config"], env=d.get("env"), cameras=d.get("cameras", []),
                   trials=d.get("trials", len(pols["model"].per_trial)), dtype=d.get("dtype"),
                   simulator=d.get("simulator"), strips=d.get("strips"), served=d.get("served"), **pols)


def plain_result(r: dict[str, Any]) -> dict[str, Any]:
    """A trial's outcome as plain JSON values (no frames): what a resumed run reads back, bit for bit."""
    return {"success": bool(r["success"]), "steps": int(r["steps"]),
            **{k: float(v) for k, v in r.items() if k.startswith(("final_", "start_"))},
            "smoothness": float(r["smoothness"]), "latencies": [float(x) for x in r["latencies"]],
            **({"loop_s": float(r["loop_s"])} if "loop_s" in r else {})}


def trial_record(trial: TrialStart, r: dict[str, Any]) -> dict[str, Any]:
    """One trial's outcome as sim.json keeps it: which start (episode, frame), success, env steps, the final and
    start distances, the mean plan latency and the control loop's seconds (simulator, rendering, encoding and planning;
    absent in trials written before it was timed), so two runs on the same trials can be compared trial by trial."""
    lat = r["latencies"]
    return {"episode": trial.episode, "start": trial.start, "group": trial.group, "success": bool(r["success"]),
            "steps": int(r["steps"]),
            **{k: float(v) for k, v in r.items() if k.startswith(("final_", "start_"))},
            "plan_s": float(np.mean(lat)) if lat else None, **({"loop_s": float(r["loop_s"])} if "loop_s" in r else {})}


def by_group(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Success per goal group (`Trial.group`): trials whose goal needs the object moved apart from those the robot
    alone can meet, so an agent-only success cannot pass for a push."""
    out: dict[str, dict[str, Any]] = {}
    for g in sorted({r.get("group", "unknown") for r in records}):
        rs = [r for r in records if r.get("group", "unknown") == g]
        out[g] = {"trials": len(rs), "successes": sum(bool(r["success"]) for r in rs),
                  "success_rate": float(np.mean([r["success"] for r in rs]))}
    return out


def summarize(trials: list[TrialStart], results: list[dict[str, Any]]) -> PolicyResult:
    """One policy's trials: success rate, steps to success, the mean of every distance, smoothness, plan latency
    percentiles, the control loop's rate (env steps per second), success per goal group and every trial's record."""
    records = [trial_record(tr, r) for tr, r in zip(trials, results)]
    dists = [k for k in results[0] if k.startswith(("final_", "start_"))]
    return PolicyResult(
        success_rate=float(np.mean([r["success"] for r in results])),
        steps_to_success=float(np.mean([r["steps"] for r in results if r["success"]]))
        if any(r["success"] for r in results) else None,
        distances={k: float(np.mean([r[k] for r in results])) for k in dists},
        smoothness=float(np.mean([r["smoothness"] for r in results])),
        latency_s=Latency.of([x for r in results for x in r["latencies"]]),
        by_group=by_group(records), per_trial=records,
        action_hz=sum(r["steps"] for r in results) / sum(r["loop_s"] for r in results)
        if all("loop_s" in r for r in results) and sum(r["loop_s"] for r in results) > 0 else None)


def save_strip(trial: TrialStart, r: dict[str, Any], out: Path) -> Path:
    """A trial's PNG strip: the executed frames (every other one) and, last, the goal."""
    from PIL import Image

    frames = [np.concatenate(list(f), axis=0) for f in r["frames"][::2][:12] + [r["goal"]]]  # cameras stacked
    h, w = frames[0].shape[:2]
    canvas = np.full((h, (w + 2) * len(frames), 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        canvas[:, i * (w + 2):i * (w + 2) + w] = f
    path = Path(out) / f"trial_e{trial.episode}_t{trial.start}_{'success' if r['success'] else 'fail'}.png"
    with atomic_output(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def commit_result(out_dir: Path, res: SimResult, waiting: dict[int, Path]) -> SimResult:
    """sim.json of this run: an earlier result of another configuration is kept beside it with its strips (moved
    into a folder named after its kept JSON); the strips of the result replaced are deleted; this run's strips
    (`waiting`: per trial index, where `SimProgress` keeps them) move in. Returns the result with its strips."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sim.json"
    kept = keep_other_result(path, res)
    if kept is not None:
        keep_strips(kept)
    elif path.is_file():
        for old in _listed_strips(path):
            old.unlink(missing_ok=True)
    strips = []
    for index in sorted(waiting):
        src = waiting[index]
        if src.is_file():
            os.replace(src, out_dir / src.name)
            strips.append(str(out_dir / src.name))
    if strips:
        res = dataclasses.replace(res, strips=strips)
    atomic_write_json(path, res.to_json())
    return res


def _listed_strips(result: Path) -> list[Path]:
    """The strip files a sim.json lists, found beside it (by name: the paths it holds may be relative to another
    working folder)."""
    try:
        listed = read_json(result).get("strips", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [result.parent / Path(s).name for s in listed if isinstance(s, str) and (result.parent / Path(s).name)
            .is_file()]


def keep_strips(kept: Path) -> None:
    """Move the strips a kept result (sim-<time>.json) lists into the folder sim-<time>/ beside it, and point its
    `strips` there: the next result's strips may have the same names (the same trials)."""
    files = _listed_strips(kept)
    if not files:
        return
    folder = kept.with_suffix("")
    folder.mkdir(exist_ok=True)
    for f in files:
        os.replace(f, folder / f.name)
    res = read_json(kept)
    res["strips"] = [str(folder / f.name) for f in files]
    atomic_write_json(kept, res)


def keep_other_result(path: Path, new: SimResult) -> Path | None:
    """A sim.json already at `path` from another configuration (other K, seed, budget, trials, dtype) is renamed
    to sim-<its time>.json beside it instead of being overwritten: a comparison run into the same folder must
    not erase the result it is compared with. The same configuration run again replaces it (idempotent).
    Returns the kept file, or None."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except (OSError, ValueError):
        old = {}
    mine = {"config": to_jsonable(new.config), "dtype": new.dtype}
    diff = config_differences({"config": old.get("config", {}), "dtype": old.get("dtype")}, mine)
    if not diff:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"sim-{stamp}.json")
    i = 1
    while kept.exists():
        kept, i = path.with_name(f"sim-{stamp}-{i}.json"), i + 1
    path.rename(kept)
    log.info("kept the earlier result of another configuration as %s (%s)", kept, "; ".join(diff[:4]))
    return kept


def load_sim_result(path: Path) -> SimResult:
    """A `plan sim` result: sim.json, or the folder holding it."""
    file = path / "sim.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no sim.json there; pass a `wmctl plan sim` output folder "
                        "(<run>/plan/sim_<planner>_<shift>/) or its sim.json")
    res = read_json(file)
    if "per_trial" not in res.get("model", {}):
        raise UserError(f"{file} has no per-trial outcomes (written before sim.json kept them): re-run that "
                        "`wmctl plan sim` to compare it trial by trial")
    return SimResult.from_json(res)


def exact_mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the probability, if A and B were equally good, of a split of the discordant
    trials at least this uneven (a binomial(n, 1/2) tail, doubled)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


_OLD_DEFAULTS = {"protocol": "gym", "success_rule": "strict"}  # what results written before these fields meant


def compare_sims(pairs: list[tuple[SimResult | dict[str, Any], SimResult | dict[str, Any]]], policy: str = "model"
                 ) -> dict[str, Any]:
    """Paired comparison of two planners (A, B) over one or more pairs of `plan sim` results (SimResult, or
    sim.json's content), each pair run on the same trials (e.g. one pair per model seed or per trial set):
    successes, the trials only one of them solves, the exact McNemar p-value of that split, and per final distance
    the means and how often A ends closer. The i-th trial of A is paired with the i-th of B, which must start from
    the same episode and frame; a pair on different trials is refused."""
    rows: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i, pair in enumerate(pairs):
        a, b = (r if isinstance(r, SimResult) else SimResult.from_json(r) for r in pair)
        if a.env != b.env:
            raise UserError(f"pair {i + 1}: A ran in {a.env}, B in {b.env}; compare runs of one simulator")
        for key in ("protocol", "goal_offset", "max_steps", "success_rule"):
            if a.config.get(key, _OLD_DEFAULTS.get(key)) != b.config.get(key, _OLD_DEFAULTS.get(key)):
                raise UserError(f"pair {i + 1}: --{key.replace('_', '-')} {a.config.get(key)} (A) vs "
                                f"{b.config.get(key)} (B): the trials are not the same task; re-run one of them "
                                "with the other's setting")
        ta, tb = a.policies[policy].per_trial, b.policies[policy].per_trial
        ka, kb = [(t["episode"], t["start"]) for t in ta], [(t["episode"], t["start"]) for t in tb]
        if ka != kb:  # in order: a trial set may hold one start twice (drawn with replacement), each its own trial
            raise UserError(f"pair {i + 1}: A and B ran different trials ({len(ka)} vs {len(kb)}, "
                            f"{len(set(ka) & set(kb))} starts in common): run both with the same --episodes, --seed "
                            "and --goal-offset on the same store")
        rows.extend(zip(ta, tb))
    dists = [k for k in rows[0][0] if k.startswith("final_")] if rows else []
    groups = sorted({x.get("group", "unknown") for x, _ in rows})
    return {
        "pairs": len(pairs), **_paired_counts(rows),
        "by_group": {g: _paired_counts([(x, y) for x, y in rows if x.get("group", "unknown") == g]) for g in groups}
        if len(groups) > 1 or groups != ["unknown"] else {},
        "distances": {k: {"mean_a": float(np.mean([x[k] for x, _ in rows])),
                          "mean_b": float(np.mean([y[k] for _, y in rows])),
                          "a_closer": sum(x[k] < y[k] for x, y in rows), "b_closer": sum(y[k] < x[k] for x, y in rows)}
                      for k in dists},
    }


def _paired_counts(rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Successes of A and B on paired trials, the discordant ones and their exact McNemar p-value."""
    only_a = sum(x["success"] and not y["success"] for x, y in rows)
    only_b = sum(y["success"] and not x["success"] for x, y in rows)
    return {"trials": len(rows), "success_a": sum(x["success"] for x, _ in rows),
            "success_b": sum(y["success"] for _, y in rows),
            "both": sum(x["success"] and y["success"] for x, y in rows),
            "only_a": only_a, "only_b": only_b, "mcnemar_p": exact_mcnemar(only_a, only_b)}
