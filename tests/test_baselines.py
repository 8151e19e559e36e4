"""The baselines the shortcut model is judged against: the `dinowm` teacher-forced preset (DINO-WM's predictor)
and the deterministic control (the shortcut backbone trained without noise)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.stage import UserError
from trainer.api import LoadedWorldModel
from trainer.config import dinowm, train_config
from trainer.eval import EvalConfig, run_eval
from trainer.loop import run_train
from trainer.model import build_model
from trainer.model.baseline import TeacherForcedPredictor
from trainer.tokens import TokenShape, pack_state

DINO_WM_PREDICTOR_PARAMS = 19e6  # DINO-WM paper: ~19M (depth 6, 16 heads, 3 x 196 tokens x 404 channels)


def test_dinowm_preset_is_dino_wm_sized_at_base_width():
    """ViT-B/16 tokens (768 wide, 14x14 at 224 px), 10-D proprio, a 2-D action at frameskip 5."""
    cfg = dinowm()
    assert cfg.model.kind == "teacher_forced" and cfg.model.depth == 6 and cfg.model.conditioning == "concat"
    assert cfg.max_context() - 1 == 3  # three history frames predict the next
    shape = TokenShape(cameras=1, grid=(14, 14), enc_dim=768, action_dim=2 * cfg.frameskip, state_dim=10)
    params = sum(p.numel() for p in build_model(cfg.model, shape).parameters())
    assert abs(params - DINO_WM_PREDICTOR_PARAMS) / DINO_WM_PREDICTOR_PARAMS < 0.2, params


def test_concat_conditioning_is_frame_causal_and_uses_action_and_state():
    cfg = dataclasses.replace(dinowm().model, dim=64, depth=2, heads=4, kv_heads=4, concat_dim=4)
    shape = TokenShape(cameras=2, grid=(2, 2), enc_dim=8, action_dim=3, state_dim=2)
    torch.manual_seed(0)
    m = TeacherForcedPredictor(cfg, shape).eval()
    g = torch.Generator().manual_seed(1)
    B, T = 2, 4
    z = pack_state(torch.randn(B, T, shape.tokens, 8, generator=g), torch.randn(B, T, 2, generator=g), shape)
    a, v = torch.randn(B, T, 3, generator=g), torch.ones(B, T, dtype=torch.bool)
    out = m(z, a, v)
    assert out.shape == z.shape and out[..., -1, 2:].abs().max() == 0
    a2 = a.clone()
    a2[:, 2] += 1.0  # the action after frame 2 changes the prediction of frame 3, nothing before
    out2 = m(z, a2, v)
    torch.testing.assert_close(out2[:, :2], out[:, :2])
    assert (out2[:, 2] - out[:, 2]).abs().max() > 1e-4
    z2 = z.clone()
    z2[:, 1, -1, :2] += 1.0  # the state of frame 1 reaches every patch of the predictions from frame 1 on
    out3 = m(z2, a, v)
    torch.testing.assert_close(out3[:, :1], out[:, :1])
    assert (out3[:, 1, :-1] - out[:, 1, :-1]).abs().max() > 1e-4
    null = m(z, a, torch.zeros_like(v))
    torch.testing.assert_close(null, m(z, a * 3, torch.zeros_like(v)))  # invalid actions are the null embedding


def test_presets_and_kinds_are_checked():
    assert train_config("dinowm").model.kind == "teacher_forced"  # the preset's kind unless --model says
    with pytest.raises(UserError, match="concat.*teacher-forced"):
        train_config("dinowm", kind="shortcut")
    det = train_config("small", kind="deterministic")
    assert det.ctx_noise == 0.0 and det.context_mode == "clean_context"
    assert det.model.conditioning == train_config("small").model.conditioning == "add"  # same backbone
    # a teacher-forced model of the small preset's size takes its actions as tokens (add is not one of its modes)
    assert train_config("small", kind="teacher-forced").model.conditioning == "token"
    with pytest.raises(UserError, match="ctx_noise=0"):
        train_config("small", kind="deterministic", overrides=["ctx_noise=0.1"])


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, pusht_store):
    out = tmp_path_factory.mktemp("runs") / "det"
    cfg = dataclasses.replace(train_config("tiny", kind="deterministic"), store=pusht_store, out=out, steps=30,
                              labelled_fraction=0.5, action_mode="relative_to_state", context_frames=6)
    return run_train(cfg)


def test_deterministic_control_learns_and_rolls_out_without_noise(det_run):
    first, last = det_run.metrics[0]["loss"], det_run.metrics[-1]["loss"]
    assert last < first  # it learns
    wm = LoadedWorldModel.load(det_run.run_dir)
    assert wm.kind == "deterministic" and not wm.sampler
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, wm.shape.latent_tokens, wm.shape.enc_dim, generator=g)
    a = torch.randn(2, 3 + 8, wm.shape.action_dim, generator=g)
    # the same answer for any seed and K (one step from nothing), and cached = uncached past the window
    p1 = wm.rollout(z, a, horizon=8, k=4, generator=torch.Generator().manual_seed(1))
    p2 = wm.rollout(z, a, horizon=8, k=1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(p1, p2)
    ref = wm.rollout(z, a, horizon=8, cached=False)
    torch.testing.assert_close(p1, ref, rtol=1e-4, atol=1e-4)
    # the planner's rollout does not depend on the noise seed either
    got = wm.planning_rollout(z[0], k=4, seed=3)(a[:2, 3:])
    assert got.shape == (2, 8, wm.shape.latent_tokens, wm.shape.enc_dim) and torch.isfinite(got).all()
    torch.testing.assert_close(got, wm.planning_rollout(z[0], k=1, seed=4)(a[:2, 3:]))


def test_deterministic_control_with_the_same_backbone_as_the_shortcut_run(det_run, tiny_run):
    """Everything but the objective equal: the control has exactly the shortcut model's parameters."""
    sc, det = LoadedWorldModel.load(tiny_run), LoadedWorldModel.load(det_run.run_dir)
    assert {k: v.shape for k, v in sc.model.state_dict().items()} == \
        {k: v.shape for k, v in det.model.state_dict().items()}


def test_eval_scores_the_control_as_a_deterministic_baseline(det_run, tiny_run, tmp_path):
    res = run_eval(EvalConfig(ckpt=tiny_run, baselines=(det_run.run_dir,), horizons=(1, 3), windows_per_episode=2,
                              out=tmp_path / "eval", probe=False, plots=False, samples=2, k_sweep=(1,)))
    name = LoadedWorldModel.load(det_run.run_dir).name
    assert res.samples[name] == 1
    row = res.conditions["actions"][name]
    assert row["samples"] == 1 and all(np.isclose(row["mse"][h], row["mse_single"][h]) for h in (1, 3))
