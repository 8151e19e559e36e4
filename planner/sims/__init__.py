"""Simulators the closed loop plans in, behind one small interface (`Simulator`), owned by the planner.

The demo-data generators (`pipeline.demodata`) drive the same simulators to record datasets, so a recorded
`observation.environment_state` (`ENV_STATE_KEY`) restores exactly the scene a planner is started from.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

ENV_STATE_KEY = "observation.environment_state"  # the full simulator state a trial resets to


@runtime_checkable
class Simulator(Protocol):
    """Reset to a recorded state, step with an environment action, render the cameras, judge a goal."""

    def reset(self, state: np.ndarray) -> np.ndarray:
        """Restore `state`; returns the cameras' images [C, H, W, 3] uint8."""

    def step(self, action: np.ndarray) -> np.ndarray:
        """Execute one environment action; returns the cameras' images [C, H, W, 3] uint8."""

    def state(self) -> np.ndarray:
        """The full restorable simulator state (what `reset` takes)."""

    def robot_state(self) -> np.ndarray:
        """The proprioceptive state, as the dataset's `observation.state` records it."""

    def distances(self, goal_state: np.ndarray, state: np.ndarray) -> dict[str, float]:
        """Named distances of `state` to `goal_state` (the first is the one reported as the final distance)."""

    def success(self, goal_state: np.ndarray, state: np.ndarray) -> bool:
        """Whether `state` meets the task's success rule for `goal_state`."""

    def close(self) -> None: ...


def make_sim(env: str, size: int) -> Simulator:
    """The simulator named by `wmctl plan sim --env`, rendering `size` x `size` frames."""
    if env == "pusht":
        from planner.sims.pusht import PushtSim

        return PushtSim(size)
    raise ValueError(f"unknown simulator {env!r}")


SIMULATORS = ("pusht",)
