"""The closed MPC loop in real gym-pusht, driven by an analytic world model of the agent (no training): it
must bring the agent to a goal made by replaying recorded actions, and the trial must end when it is reached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.sims.pusht import PushtSim
from planner.cem import CEMConfig
from planner.planners import spec_for
from planner.sim import SimConfig, Trial, run_trial
from trainer.actions import ActionSpace

SCALE = 100.0  # px per latent unit


class AgentModel:
    """Latents of two tokens: a constant 'patch' and the state token (agent xy / SCALE). Each env step moves
    the agent about a third of the way to its relative target (pusht's PD controller, first step)."""

    encoder: dict = {}
    window = 4
    state_dim = 2
    actions = ActionSpace("relative_to_state", 2, np.zeros(2), np.full(2, 24.0))  # bounds: +-60 px per step
    frameskip = actions.frameskip
    dtype = torch.float32

    def normalize(self, tokens, state=None):
        raise NotImplementedError

    def for_source(self, reader, source):
        return self  # one camera-free latent layout for every source

    def planning_rollout(self, context_TNZ, *, context_actions_TA=None, k=4, seed=0):
        def rollout(actions_SHA, grad=False):
            S, H, _ = actions_SHA.shape
            agent = context_TNZ[-1, 1].expand(S, 2) * SCALE
            out = []
            for h in range(H):
                for j in range(self.frameskip):
                    agent = agent + 0.35 * actions_SHA[:, h, 2 * j:2 * j + 2]
                out.append(torch.stack([torch.zeros(S, 2), agent / SCALE], dim=1))
            return torch.stack(out, dim=1)  # [S, H, 2, 2]

        return rollout


def encode(img, agent_xy):
    return torch.tensor([[0.0, 0.0], [agent_xy[0] / SCALE, agent_xy[1] / SCALE]], dtype=torch.float32)


def test_mpc_brings_the_agent_to_the_goal_and_the_trial_ends_there():
    wm = AgentModel()
    # agent at (100, 100), the T block far away at (350, 350); the goal replays 15 steps towards (190, 140)
    trial = Trial(episode=0, start=0, env_state=np.array([100.0, 100.0, 350.0, 350.0, 0.0]),
                  actions=np.tile([190.0, 140.0], (15, 1)))
    cfg = SimConfig(trials=1, goal_offset=15, max_steps=40, horizon=3, execute=1, save_strips=0,
                    cem=CEMConfig(samples=64, elites=8, iterations=4))
    sim = PushtSim(96)
    try:
        r = run_trial(sim, wm, encode, trial, cfg, spec_for(wm, cfg.max_delta_fraction), "model",
                      np.random.default_rng(0))
        start_dist = r["start_pos_dist"]
    finally:
        sim.close()
    assert start_dist > 80  # the goal is far from the start ...
    assert r["success"] and r["final_pos_dist"] < 20  # ... and reached
    assert r["steps"] < cfg.max_steps  # the trial stopped when the goal was reached
    assert r["final_block_dist"] < 1.0  # the block was never touched
    assert len(r["latencies"]) == r["steps"] // (wm.frameskip * cfg.execute)  # one plan per MPC step


def test_goal_groups_and_probe_targets_of_pusht():
    """A goal whose block pose is beyond the success tolerance from the start needs a push; one whose block stays
    (within 20 px and pi/9) can be met by moving the agent alone. Probe targets give the angle as sin/cos."""
    import math

    from pipeline.sims.pusht import pusht_goal_group, pusht_probe_targets

    start = np.array([100.0, 100.0, 256.0, 256.0, 0.5])
    assert pusht_goal_group(start, start + [200, 0, 0, 0, 0]) == "agent"  # only the agent moves
    assert pusht_goal_group(start, start + [0, 0, 19, 0, 0.3]) == "agent"  # block within both tolerances
    assert pusht_goal_group(start, start + [0, 0, 20, 0, 0]) == "push"
    assert pusht_goal_group(start, start + [0, 0, 0, 0, math.pi / 9]) == "push"
    assert pusht_goal_group(start, start + [0, 0, 0, 0, 2 * math.pi - 0.1]) == "agent"  # angles wrap
    t = pusht_probe_targets(np.stack([start, start + [1, 2, 3, 4, 0.1]]))
    assert list(t) == ["agent_x", "agent_y", "block_x", "block_y", "block_sin", "block_cos"]
    assert t["block_y"][1] == 260.0 and t["block_sin"][0] == pytest.approx(math.sin(0.5))
