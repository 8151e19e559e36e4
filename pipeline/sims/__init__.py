"""Simulators behind one small interface (`Simulator`), at the ground floor: gym-pusht (`pusht`) and Meta-World arm
tasks (`metaworld-reach`, `metaworld-push`). The data stage records in them (`pipeline.demodata`) and the planner
closes the loop in them (`planner.sim`), so neither stage imports the other; a recorded
`observation.environment_state` (`ENV_STATE_KEY`) restores exactly the scene a planner is started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

ENV_STATE_KEY = "observation.environment_state"  # the full simulator state a trial resets to
GENERATOR_MARKER = "meta/wmctl_generator.json"  # written by `wmctl data`: how (and in which simulator) it was recorded


@runtime_checkable
class Simulator(Protocol):
    """Reset to a recorded state, step with an environment action, render the cameras, judge a goal.

    Optional: `trial_ok(start_state, goal_state)` (which start/goal pairs make a trial; default: the start does not
    already meet the goal), `oracle_action(goal_state)` (a privileged controller towards the goal: the upper bound
    `plan sim` runs alongside) and `describe()` (settings recorded in sim.json)."""

    def reset(self, state: np.ndarray) -> np.ndarray:
        """Restore `state`; returns the cameras' images [C, H, W, 3] uint8."""

    def step(self, action: np.ndarray, render: bool = True) -> np.ndarray | None:
        """Execute one environment action; returns the cameras' images [C, H, W, 3] uint8, or None with
        `render=False` (a step nobody looks at: a model frame's env steps before its last; a simulator whose step
        renders anyway may return the images regardless)."""

    def state(self) -> np.ndarray:
        """The full restorable simulator state (what `reset` takes)."""

    def robot_state(self) -> np.ndarray:
        """The proprioceptive state, as the dataset's `observation.state` records it."""

    def distances(self, goal_state: np.ndarray, state: np.ndarray) -> dict[str, float]:
        """Named distances of `state` to `goal_state` (the first is the one reported as the final distance)."""

    def success(self, goal_state: np.ndarray, state: np.ndarray) -> bool:
        """Whether `state` meets the task's success rule for `goal_state`."""

    def close(self) -> None: ...

    def probe_targets(self, states_NS: np.ndarray) -> dict[str, np.ndarray]:
        """Named scalar facts of the scene per recorded state [N, S] (object and robot positions, an angle as sin
        and cos): what a feature probe asks the tokens to know."""

    def goal_group(self, start_state: np.ndarray, goal_state: np.ndarray) -> str:
        """What a trial's goal demands: "push" when the object must be moved by more than the success rule's
        tolerance, "agent" when moving the robot alone can meet it."""


def trial_ok(sim: Simulator, start_state: np.ndarray, goal_state: np.ndarray) -> bool:
    """Whether a start/goal pair makes a trial: the simulator's own rule where it has one (`trial_ok`), else that
    the start does not already meet the goal."""
    rule = getattr(sim, "trial_ok", None)
    return bool(rule(start_state, goal_state)) if rule else not sim.success(goal_state, start_state)


def make_sim(env: str, size: int, *, fps: int | None = None, camera_keys: list[str] | None = None,
             success_rule: str = "metaworld") -> Simulator:
    """The simulator named by `wmctl plan sim --env`, rendering `size` x `size` frames at the dataset's `fps`,
    its cameras in the order of `camera_keys` (the token store's camera order); `success_rule` for Meta-World (its
    own flag, or `strict`)."""
    if env == "pusht":
        from pipeline.sims.pusht import PushtSim

        return PushtSim(size)
    if env.startswith("metaworld-"):
        from pipeline.sims.metaworld import MetaWorldSim

        return MetaWorldSim(env.removeprefix("metaworld-"), size, fps=fps or 20, camera_keys=camera_keys,
                            success_rule=success_rule)
    raise ValueError(f"unknown simulator {env!r}")


def goal_group(sim: Simulator, start_state: np.ndarray, goal_state: np.ndarray) -> str:
    """What a trial's goal demands ("push": the object must move beyond the success tolerance; "agent": the robot
    alone can meet it), by the simulator's rule; "unknown" where it has none."""
    rule = getattr(sim, "goal_group", None)
    return str(rule(start_state, goal_state)) if rule else "unknown"


def recorded_sim(root: Path) -> str | None:
    """The `--env` the dataset at `root` was recorded in by `wmctl data` (its generator marker), else None."""
    marker = Path(root) / GENERATOR_MARKER
    if not marker.is_file():
        return None
    try:
        return sim_for_dataset(json.loads(marker.read_text()))
    except (OSError, ValueError):
        return None


def sim_for_dataset(generator: dict | None) -> str | None:
    """The `--env` a dataset written by `wmctl data` was recorded in (its generator record), else None."""
    if not generator:
        return None
    if generator.get("generator") == "pusht":
        return "pusht"
    if generator.get("generator") == "metaworld":
        return f"metaworld-{generator['task']}"
    return None


SIMULATORS = ("pusht", "metaworld-reach", "metaworld-push")
