"""Planners on an analytic world model (linear latent dynamics with a known optimum), and constraints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.cem import CEMConfig, cem_plan, warm_start
from planner.core import ActionSpec, latent_cost, project
from planner.gd import GDConfig, gd_plan
from planner.results import compare_sims, exact_mcnemar

Z, A, H = 6, 2, 4
torch.manual_seed(0)
B_MAT = torch.randn(A, Z)  # z_{t+1} = z_t + a_t @ B
Z0 = torch.randn(Z)
A_STAR = torch.tensor([[0.3, -0.2]] * H)  # the optimal plan: constant actions (smoothness picks the even split)
GOAL = Z0 + A_STAR.sum(0) @ B_MAT
SPEC = ActionSpec(low=(-1.0, -1.0), high=(1.0, 1.0), max_delta=(0.5, 0.5))


def linear_rollout(actions_SHA: torch.Tensor) -> torch.Tensor:
    """Latents [S, H, N=1, Z] of the analytic model (differentiable)."""
    return (Z0 + torch.cumsum(actions_SHA @ B_MAT, dim=1))[:, :, None, :]


def test_cem_reaches_the_known_optimum():
    cost = latent_cost(GOAL[None], smoothness=0.5)
    res = cem_plan(linear_rollout, cost, SPEC, CEMConfig(horizon=H, samples=256, elites=16, iterations=30),
                   generator=torch.Generator().manual_seed(0))
    assert res.cost < 1e-3
    torch.testing.assert_close(res.actions, A_STAR, atol=0.06, rtol=0)
    assert res.costs_per_iteration == sorted(res.costs_per_iteration, reverse=True)  # best-so-far never rises
    assert res.model_evaluations == 256 * 30


def test_gradient_planner_reaches_the_known_optimum():
    cost = latent_cost(GOAL[None], smoothness=0.5)
    res = gd_plan(linear_rollout, cost, SPEC, GDConfig(horizon=H, restarts=4, iterations=300, lr=0.05),
                  generator=torch.Generator().manual_seed(0))
    assert res.cost < 1e-3
    torch.testing.assert_close(res.actions, A_STAR, atol=0.06, rtol=0)


def test_planners_prefer_the_goal_over_an_unreachable_shortcut():
    far = Z0 + torch.tensor([5.0, 5.0]) @ B_MAT  # needs actions of 1.25 > bound 1: best is the bound itself
    cost = latent_cost(far[None])
    res = cem_plan(linear_rollout, cost, SPEC, CEMConfig(horizon=H, samples=256, elites=16, iterations=30),
                   generator=torch.Generator().manual_seed(1))
    assert torch.allclose(res.actions, torch.ones(H, A), atol=0.05)


def test_constraints_are_never_violated():
    """Property test: for random specs, random (wild) candidates and random previous actions, the projection
    and the plans of both planners respect bounds and per-step deltas."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        lo = -torch.rand(3, generator=g) * 3
        hi = lo + 0.1 + torch.rand(3, generator=g) * 3
        md = 0.05 + torch.rand(3, generator=g)
        spec = ActionSpec(tuple(lo.tolist()), tuple(hi.tolist()), tuple(md.tolist()))
        prev = lo + torch.rand(3, generator=g) * (hi - lo)
        wild = torch.randn(32, 7, 3, generator=g) * 10
        for a in (project(wild, spec, prev),
                  cem_plan(lambda x: x[:, :, None, :], latent_cost(torch.randn(1, 3, generator=g) * 5), spec,
                           CEMConfig(horizon=7, samples=32, elites=4, iterations=3), generator=g,
                           previous_A=prev).actions[None],
                  gd_plan(lambda x: x[:, :, None, :], latent_cost(torch.randn(1, 3, generator=g) * 5), spec,
                          GDConfig(horizon=7, restarts=2, iterations=5), generator=g, previous_A=prev).actions[None]):
            assert torch.all(a >= lo - 1e-6) and torch.all(a <= hi + 1e-6), trial
            steps = torch.cat([prev.expand(a.shape[0], 1, 3), a], dim=1).diff(dim=1).abs()
            assert torch.all(steps <= md + 1e-5), (trial, (steps - md).max())


def test_warm_start_shifts_the_previous_plan():
    prev = torch.arange(10.0).view(5, 2)
    ws = warm_start(prev, executed=2, horizon=5, dim=2)
    torch.testing.assert_close(ws, torch.tensor([[4.0, 5], [6, 7], [8, 9], [8, 9], [8, 9]]))
    assert warm_start(prev, executed=5, horizon=5, dim=2) is None


def test_cost_variants():
    goal = torch.zeros(1, 2)
    lat = torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]])  # S=1, H=2
    acts = torch.tensor([[[0.0], [1.0]]])
    assert latent_cost(goal)(lat, acts).item() == pytest.approx(2.0)  # last frame, MSE
    assert latent_cost(goal, metric="l1")(lat, acts).item() == pytest.approx(1.0)
    assert latent_cost(goal, frame_weights=torch.tensor([1.0, 1.0]))(lat, acts).item() == pytest.approx(1.5)
    assert latent_cost(goal, smoothness=2.0)(lat, acts).item() == pytest.approx(4.0)


def test_latent_cost_with_a_state_token_weighs_patches_and_state_apart():
    g = torch.Generator().manual_seed(0)
    goal = torch.randn(5, 8, generator=g)  # 4 patch tokens + the state token (2 channels, padded with zeros)
    goal[-1, 2:] = 0
    lat = torch.randn(3, 2, 5, 8, generator=g)
    lat[..., -1, 2:] = 0
    acts = torch.zeros(3, 2, 1)
    d = lat[:, -1] - goal
    want = d[:, :-1].pow(2).mean((1, 2)) + 3.0 * d[:, -1, :2].pow(2).mean(-1)
    torch.testing.assert_close(latent_cost(goal, state_dim=2, state_weight=3.0)(lat, acts), want)
    torch.testing.assert_close(latent_cost(goal)(lat, acts), d.pow(2).mean((1, 2)))  # no state: plain MSE


def test_coloured_noise_is_white_at_beta_0_and_low_frequency_heavy_at_beta_2():
    from planner.cem import coloured_noise

    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(coloured_noise((8, 5, 2), 0.0, g1), torch.randn((8, 5, 2), generator=g2))
    x = coloured_noise((4000, 16, 2), 2.0, torch.Generator().manual_seed(1))
    assert abs(float(x.std()) - 1.0) < 0.05  # unit variance per step
    power = torch.fft.rfft(x, dim=1).abs().pow(2).mean(dim=(0, 2))  # [frequencies]
    assert power[1] > 10 * power[-1]  # ~1/f^2: slow changes dominate, as iCEM samples
    lag1 = float((x[:, 1:] * x[:, :-1]).mean())
    assert lag1 > 0.5  # consecutive actions are correlated (white noise: ~0)


def test_icem_preset_reaches_the_optimum_and_re_evaluates_its_elites():
    from planner.cem import cem_preset

    cost = latent_cost(GOAL[None], smoothness=0.5)
    seen = []

    def spy(actions_SHA):
        seen.append(actions_SHA.clone())
        return linear_rollout(actions_SHA)

    cfg = cem_preset("icem", horizon=H, samples=128, iterations=12)
    res = cem_plan(spy, cost, SPEC, cfg, generator=torch.Generator().manual_seed(0))
    assert res.cost < 1e-2
    assert res.costs_per_iteration == sorted(res.costs_per_iteration, reverse=True)
    n_keep = round(cfg.keep_elites * cfg.elites)
    for before, after in zip(seen, seen[1:]):  # the best of one iteration is among the next one's samples
        best = before[int(torch.argmin(cost(linear_rollout(before), before)))]
        assert any(torch.equal(best, a) for a in after[-n_keep:])
    with pytest.raises(ValueError, match="preset"):
        cem_preset("nope")


def test_a_frame_action_added_up_by_kind_executes_as_steps_that_add_back_up():
    """A model trained at a rate in seconds takes one action per model frame: its frameskip steps added up by
    kind (delta summed, absolute the last, velocity the mean), the same in numpy and torch; the planner's box is
    that wide, and a planned frame action executes as steps that add back up to it (delta split evenly, the others
    held). Without kinds a frame's steps are concatenated (frameskip x A wide)."""
    from trainer.actions import ActionSpace

    kinds = ("delta", "delta", "absolute", "velocity")
    space = ActionSpace("absolute", 3, np.zeros(4), np.ones(4), kinds)
    steps = np.arange(24, dtype=np.float64).reshape(6, 4)  # two frames of three steps
    frames = space.per_frame(steps)
    np.testing.assert_allclose(frames, [[12, 15, 10, 7], [48, 51, 22, 19]])
    torch.testing.assert_close(space.per_frame(torch.from_numpy(steps)), torch.from_numpy(frames))
    for f in frames:
        np.testing.assert_allclose(space.per_frame(space.frame_steps(f)), f[None])
    assert space.frame_dim == 4 and len(space.bounds()[0]) == 4
    concat = ActionSpace("absolute", 3, np.zeros(4), np.ones(4))
    assert concat.frame_dim == 12 and concat.per_frame(steps).shape == (2, 12)


def test_exact_mcnemar_matches_the_binomial_tail():
    # two-sided: 2 * P(X <= min) for X ~ Binomial(only_a + only_b, 1/2)
    assert exact_mcnemar(0, 6) == pytest.approx(2 / 64) and exact_mcnemar(6, 0) == exact_mcnemar(0, 6)
    assert exact_mcnemar(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert exact_mcnemar(0, 3) == pytest.approx(0.25) and exact_mcnemar(0, 0) == 1.0 and exact_mcnemar(5, 5) == 1.0


def _sim(outcomes, dists, goal_offset=15, env="pusht", starts=None):
    trials = [{"episode": 1, "start": s, "success": ok, "steps": 4, "final_pos_dist": d}
              for s, ok, d in zip(starts or range(len(outcomes)), outcomes, dists)]
    return {"env": env, "config": {"goal_offset": goal_offset, "max_steps": 30}, "model": {"per_trial": trials}}


def test_compare_sims_pairs_trials_pools_pairs_and_refuses_other_trials():
    a1, b1 = _sim([True, True, False, False], [5, 9, 40, 30]), _sim([True, False, True, False], [8, 30, 10, 20])
    a2, b2 = _sim([False, True], [50, 3], starts=[7, 9]), _sim([False, False], [60, 25], starts=[7, 9])
    c = compare_sims([(a1, b1), (a2, b2)])
    assert (c["pairs"], c["trials"], c["success_a"], c["success_b"]) == (2, 6, 3, 2)
    assert (c["both"], c["only_a"], c["only_b"]) == (1, 2, 1) and c["mcnemar_p"] == pytest.approx(1.0)
    d = c["distances"]["final_pos_dist"]
    assert (d["a_closer"], d["b_closer"]) == (4, 2) and d["mean_a"] == pytest.approx(137 / 6)
    # a trial set may hold one start twice (the sim draws starts with replacement): each is its own trial
    twice = compare_sims([(_sim([True, False], [5, 30], starts=[3, 3]), _sim([False, False], [40, 35], starts=[3, 3]))])
    assert (twice["trials"], twice["only_a"], twice["only_b"]) == (2, 1, 0)
    from pipeline.stage import UserError
    with pytest.raises(UserError, match="different trials"):
        compare_sims([(a1, _sim([True] * 4, [1] * 4, starts=[0, 1, 2, 5]))])
    with pytest.raises(UserError, match="different trials"):  # the same starts in another order are other pairs
        compare_sims([(a1, _sim([True] * 4, [1] * 4, starts=[1, 0, 2, 3]))])
    with pytest.raises(UserError, match="--goal-offset"):
        compare_sims([(a1, _sim([True] * 4, [1] * 4, goal_offset=10))])
    with pytest.raises(UserError, match="one simulator"):
        compare_sims([(a1, _sim([True] * 4, [1] * 4, env="metaworld-reach"))])
