"""World-model units against naive references: causality, GQA, RoPE, soft-capping, the shortcut loss,
the null action, and the KV-cached rollout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from trainer.config import ModelConfig, tiny
from trainer.losses import TauSampling, sample_tau_d, shortcut_forcing_loss, teacher_forcing_loss
from trainer.model.baseline import TeacherForcedPredictor
from trainer.model.common import Attention, apply_rope, rope_angles
from trainer.model.dynamics import ShortcutDynamics, merge_2x2, unmerge_2x2
from trainer.sampling import rollout_cached, rollout_uncached
from trainer.tokens import FrameLayout, TokenShape, frame_error, pack_state, split_state

SHAPE = TokenShape(cameras=2, grid=(4, 4), enc_dim=8, action_dim=3)


def _model(kind: str = "shortcut", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().model, kind=kind, **kw)
    m = ShortcutDynamics(cfg, SHAPE) if kind == "shortcut" else TeacherForcedPredictor(cfg, SHAPE)
    return m.eval()


def _inputs(B=2, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, SHAPE.tokens, SHAPE.enc_dim, generator=g)
    tau = torch.rand(B, T, generator=g)
    d = torch.full((B, T), 0.25)
    a = torch.randn(B, T, SHAPE.action_dim, generator=g)
    v = torch.ones(B, T, dtype=torch.bool)
    return z, tau, d, a, v


@pytest.mark.parametrize("kind,kw", [("shortcut", {}), ("shortcut", {"conditioning": "add"}),
                                     ("teacher_forced", {})])
def test_perturbing_a_later_frame_leaves_earlier_outputs_unchanged(kind, kw):
    m = _model(kind, merge_2x2=True, **kw)
    z, tau, d, a, v = _inputs()
    run = (lambda z_, a_: m(z_, tau, d, a_, v)) if kind == "shortcut" else (lambda z_, a_: m(z_, a_, v))
    base = run(z, a)
    for t in range(z.shape[1] - 1):
        z2, a2 = z.clone(), a.clone()
        z2[:, t + 1:] += torch.randn_like(z2[:, t + 1:])
        a2[:, t + 1:] += 1.0
        out = run(z2, a2)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3  # and the perturbed frame does change


def _naive_attention(x, attn: Attention, repeat_kv: int):
    """Textbook multi-head attention with the module's weights (QK-norm, no RoPE, no mask)."""
    B, L, D = x.shape
    H, E = attn.heads, attn.head_dim
    q = attn.q_norm(attn.q(x).view(B, L, H, E))
    k, v = attn.kv(x).view(B, L, 2, attn.kv_heads, E).unbind(2)
    k = attn.k_norm(k)
    k, v = k.repeat_interleave(repeat_kv, dim=2), v.repeat_interleave(repeat_kv, dim=2)
    out = torch.empty(B, L, H, E)
    for h in range(H):
        s = torch.einsum("ble,bme->blm", q[:, :, h], k[:, :, h]) / math.sqrt(E)
        out[:, :, h] = torch.softmax(s, -1) @ v[:, :, h]
    return attn.out(out.reshape(B, L, H * E))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gqa_matches_naive_attention_and_equals_mha_when_kv_heads_equal_heads(kv_heads):
    torch.manual_seed(0)
    attn = Attention(32, heads=4, kv_heads=kv_heads)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), _naive_attention(x, attn, 4 // kv_heads), rtol=1e-5, atol=1e-5)
    if kv_heads == 2:  # GQA == MHA whose k/v heads are the shared heads repeated
        mha = Attention(32, heads=4, kv_heads=4)
        mha.load_state_dict({**attn.state_dict(), "kv.weight": _repeat_kv_weight(attn.kv.weight, 2, 2, 8)})
        torch.testing.assert_close(mha(x), attn(x), rtol=1e-5, atol=1e-5)


def _repeat_kv_weight(w, kv_heads, rep, E):
    k, v = w.view(2, kv_heads, E, -1).unbind(0)
    return torch.cat([k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)]).reshape(-1, w.shape[-1])


def test_softcap_path_equals_sdpa_when_the_cap_is_far():
    torch.manual_seed(0)
    a = Attention(32, 4, 2, softcap=None)
    b = Attention(32, 4, 2, softcap=1e6)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(a(x, causal=True), b(x, causal=True), rtol=1e-5, atol=1e-5)
    c = Attention(32, 4, 2, softcap=0.5)  # a tight cap does change the result
    c.load_state_dict(a.state_dict())
    assert (c(x) - a(x)).abs().max() > 1e-3


@pytest.mark.parametrize("cap", [0.5, 50.0])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_softcapped_attention_equals_the_textbook_tanh_cap(cap, kv_heads):
    """The soft-capped path (sigmoid form, scale folded into the queries, gain and mask in one add) against
    textbook attention with logits cap * tanh(s / cap): unmasked, causal and with a per-sample mask, grouped-query
    heads or not; and its gradients are those of the reference (the in-place sigmoid is autograd-safe)."""
    torch.manual_seed(0)
    attn = Attention(32, heads=4, kv_heads=kv_heads, softcap=cap)
    x = (torch.randn(2, 7, 32) * 3).requires_grad_(True)
    B, L, H, E = 2, 7, 4, 8
    q = attn.q_norm(attn.q(x).view(B, L, H, E))
    k, v = attn.kv(x).view(B, L, 2, kv_heads, E).unbind(2)
    k, v = attn.k_norm(k).repeat_interleave(4 // kv_heads, 2), v.repeat_interleave(4 // kv_heads, 2)
    s = torch.einsum("blhe,bmhe->bhlm", q, k) / math.sqrt(E)
    s = cap * torch.tanh(s / cap)
    sample_mask = torch.rand(B, 1, 1, L, generator=torch.Generator().manual_seed(1)) > 0.3
    sample_mask[..., 0] = True
    masks = {"none": None, "causal": torch.ones(L, L, dtype=torch.bool).tril(), "per sample": sample_mask}
    for name, mask in masks.items():
        ref_s = s if mask is None else s.masked_fill(~mask, float("-inf"))
        ref = attn.out(torch.einsum("bhlm,bmhe->blhe", ref_s.softmax(-1), v).reshape(B, L, H * E))
        got = attn(x, causal=name == "causal", mask_LM=mask if name == "per sample" else None)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)
        g_ref, = torch.autograd.grad(ref.pow(2).sum(), x, retain_graph=True)
        g_got, = torch.autograd.grad(got.pow(2).sum(), x, retain_graph=True)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5, msg=name)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pq, pk):
        aq = rope_angles(torch.tensor([pq]), 16, 10_000.0)
        ak = rope_angles(torch.tensor([pk]), 16, 10_000.0)
        return (apply_rope(q, aq) * apply_rope(k, ak)).sum().item()

    for shift in (1, 7, 100):
        assert score(3 + shift, 9 + shift) == pytest.approx(score(3, 9), rel=1e-4, abs=1e-5)
    assert score(3, 9) != pytest.approx(score(3, 4), rel=1e-3)
    rot = apply_rope(q, rope_angles(torch.tensor([5]), 16, 10_000.0))
    assert rot.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


def test_merge_2x2_roundtrips_and_groups_neighbours():
    z = torch.randn(2, 3, SHAPE.tokens, SHAPE.enc_dim)
    m = merge_2x2(z, SHAPE)
    assert m.shape == (2, 3, SHAPE.tokens // 4, 4 * SHAPE.enc_dim)
    torch.testing.assert_close(unmerge_2x2(m, SHAPE), z)
    grid = z[0, 0, :16].view(4, 4, SHAPE.enc_dim)  # camera 0
    torch.testing.assert_close(m[0, 0, 0], torch.cat([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]))


def test_shortcut_loss_matches_a_hand_computation():
    """f(z, tau, d) = a z + b tau + c d: every term of Eq. 7 written out by hand for 2 frames."""
    a, b, c = 0.7, 0.3, -0.2

    def f(z, tau, d, rows=None):
        return a * z + b * tau[:, :, None, None] + c * d[:, :, None, None]

    z1 = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]]]])  # [B=1, T=2, N=1, Z=2]
    z0 = torch.tensor([[[[0.2, 0.4]], [[-1.0, 1.0]]]])
    tau = torch.tensor([[0.25, 0.5]])
    d = torch.tensor([[0.5, 0.125]])  # frame 0 bootstraps (d > 1/8), frame 1 is the flow term
    loss, aux = shortcut_forcing_loss(f, z1, z0, tau, d, k_max=8)
    # frame 1: flow term in x-space
    zt1 = (1 - 0.5) * z0[0, 1, 0] + 0.5 * z1[0, 1, 0]
    flow = ((a * zt1 + b * 0.5 + c * 0.125 - z1[0, 1, 0]) ** 2).mean()
    # frame 0: two half steps of d/2 = 0.25
    zt0 = 0.75 * z0[0, 0, 0] + 0.25 * z1[0, 0, 0]
    b1 = (a * zt0 + b * 0.25 + c * 0.25 - zt0) / 0.75
    zmid = zt0 + b1 * 0.25
    b2 = (a * zmid + b * 0.5 + c * 0.25 - zmid) / 0.5
    v_pred = (a * zt0 + b * 0.25 + c * 0.5 - zt0) / 0.75
    boot = 0.75**2 * ((v_pred - (b1 + b2) / 2) ** 2).mean()
    expected = ((0.9 * 0.25 + 0.1) * boot + (0.9 * 0.5 + 0.1) * flow) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert aux["loss_flow"].item() == pytest.approx(flow.item(), rel=1e-6)
    assert aux["loss_boot"].item() == pytest.approx(boot.item(), rel=1e-6)
    # loss_weight_floor=1: the same terms, every signal level weighted 1; 0.5: w = 0.5 + 0.5 tau
    uniform, _ = shortcut_forcing_loss(f, z1, z0, tau, d, k_max=8, floor=1.0)
    assert uniform.item() == pytest.approx(((boot + flow) / 2).item(), rel=1e-6)
    half, _ = shortcut_forcing_loss(f, z1, z0, tau, d, k_max=8, floor=0.5)
    assert half.item() == pytest.approx(((0.5 + 0.5 * 0.25) * boot + (0.5 + 0.5 * 0.5) * flow).item() / 2, rel=1e-6)
    # first_frame=False: frame 0 (no history in a clean-context window) is out of the loss, frame 1 alone counts
    later, _ = shortcut_forcing_loss(f, z1, z0, tau, d, k_max=8, first_frame=False)
    assert later.item() == pytest.approx(((0.9 * 0.5 + 0.1) * flow).item(), rel=1e-6)


def test_bootstrap_targets_carry_no_gradient():
    w = torch.nn.Parameter(torch.tensor(0.5))
    calls = []

    def f(z, tau, d, rows=None):
        calls.append(torch.is_grad_enabled())
        return w * z

    z1 = torch.randn(1, 2, 1, 2)
    loss, _ = shortcut_forcing_loss(f, z1, torch.randn_like(z1), torch.tensor([[0.0, 0.5]]),
                                    torch.tensor([[1.0, 0.5]]), k_max=4)
    loss.backward()
    assert calls == [True, False, False] and w.grad is not None


def test_bootstrap_passes_run_on_the_bootstrap_rows_only_and_change_nothing():
    """Only samples with a bootstrap frame get the two no-grad passes (with their own rows' conditioning); the
    loss equals the mean of the samples' losses computed one by one."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(4, 1, 1, 3, generator=g)  # per-sample conditioning, bound like the actions
    seen = []

    def f(z, tau, d, rows=None):
        seen.append((torch.is_grad_enabled(), None if rows is None else rows.tolist()))
        c = cond if rows is None else cond[rows]
        return 0.6 * z + 0.2 * tau[:, :, None, None] + c * d[:, :, None, None]

    z1, z0 = torch.randn(4, 3, 2, 3, generator=g), torch.randn(4, 3, 2, 3, generator=g)
    tau = torch.tensor([[0.0, 0.25, 0.5]] * 4)
    d = torch.full((4, 3), 1 / 8)
    d[2, 1] = 0.5  # sample 2 bootstraps one frame; the others train the flow term only
    loss, _ = shortcut_forcing_loss(f, z1, z0, tau, d, k_max=8)
    assert seen == [(True, None), (False, [2]), (False, [2])]
    one_by_one = []
    for i in range(4):
        def fi(z, tau_, d_, rows=None, i=i):
            return 0.6 * z + 0.2 * tau_[:, :, None, None] + cond[i:i + 1] * d_[:, :, None, None]
        one_by_one.append(shortcut_forcing_loss(fi, z1[i:i + 1], z0[i:i + 1], tau[i:i + 1], d[i:i + 1], k_max=8)[0])
    assert loss.item() == pytest.approx(torch.stack(one_by_one).mean().item(), rel=1e-6)


def test_teacher_forcing_loss_is_next_frame_mse():
    z = torch.randn(2, 4, 3, 5)
    loss, _ = teacher_forcing_loss(lambda x: x, z)  # predicting "same as before" = copy-last
    assert loss.item() == pytest.approx((z[:, :-1] - z[:, 1:]).pow(2).mean().item(), rel=1e-6)


def test_tau_d_sampling_is_on_the_dyadic_grid():
    spec = TauSampling(k_max=16, bootstrap_fraction=1.0)
    g = torch.Generator().manual_seed(0)
    taus, ds = zip(*(sample_tau_d(spec, 64, g) for _ in range(50)))
    tau, d = torch.cat(taus), torch.cat(ds)
    assert set(d.unique().tolist()) == {1.0, 0.5, 0.25, 0.125, 0.0625}
    assert torch.all(tau <= 1 - d + 1e-6) and torch.allclose(tau / d, torch.round(tau / d), atol=1e-5)
    flow = sample_tau_d(TauSampling(k_max=16, flow_only=True), 64, g)[1]
    assert torch.all(flow == 1 / 16)
    rows = [sample_tau_d(TauSampling(k_max=16, bootstrap_fraction=0.25), 8, g)[1] for _ in range(400)]
    share = sum(bool((r > 1 / 16).any()) for r in rows) / 400
    assert 0.15 < share < 0.3


@pytest.mark.parametrize("conditioning", ["token", "add"])
def test_null_action_path(conditioning):
    m = _model(conditioning=conditioning)
    z, tau, d, a, v = _inputs()
    null = torch.zeros_like(v)
    out_null = m(z, tau, d, a, null)
    torch.testing.assert_close(out_null, m(z, tau, d, a * 5 - 3, null))  # actions are ignored when invalid
    torch.testing.assert_close(out_null, m(z, tau, d, None, None))  # = no actions at all
    assert (m(z, tau, d, a, v) - out_null).abs().max() > 1e-4  # valid actions do condition
    out_null.pow(2).mean().backward()
    assert m.null_action.grad is not None and m.null_action.grad.abs().sum() > 0
    # nothing reaches the action MLP from action-free clips (it stays in the graph, so DDP sees every parameter)
    assert m.action_mlp[0].weight.grad.abs().sum() == 0


def test_added_actions_reach_every_latent_token_of_their_frame_only():
    """conditioning="add": each latent token's input carries its frame's action embedding (the action token
    too); registers and the shortcut token do not."""
    m, plain = _model(conditioning="add"), _model()
    z, tau, d, a, v = _inputs()
    x_act, x_null = m.tokens(z, tau, d, a, v), m.tokens(z, tau, d, None, None)
    r, q = m.cfg.registers, m.io.q_tokens
    act = m.action_token(a, v, *a.shape[:2]) - m.action_token(None, None, *a.shape[:2])  # [B, T, D]
    assert act.abs().min() > 0
    torch.testing.assert_close(x_act[:, :, r:r + q] - x_null[:, :, r:r + q], act[:, :, None].expand(-1, -1, q, -1))
    torch.testing.assert_close(x_act[:, :, -1] - x_null[:, :, -1], act)
    torch.testing.assert_close(x_act[:, :, :r], x_null[:, :, :r])
    torch.testing.assert_close(x_act[:, :, -2], x_null[:, :, -2])
    y_act, y_null = plain.tokens(z, tau, d, a, v), plain.tokens(z, tau, d, None, None)
    torch.testing.assert_close(y_act[:, :, :-1], y_null[:, :, :-1])  # token conditioning: the action token alone


@pytest.mark.parametrize("conditioning", ["token", "add"])
def test_kv_cached_rollout_equals_uncached(conditioning):
    m = _model(conditioning=conditioning)
    z, _, _, a, v = _inputs(B=2, T=7)
    v[:, 5] = False  # one null action in the middle
    for k in (1, 4):
        kw = dict(horizon=4, k=k, ctx_noise=0.1, window=7)
        cached = rollout_cached(m, z[:, :3], a, v, generator=torch.Generator().manual_seed(3), **kw)
        ref = rollout_uncached(m, z[:, :3], a, v, generator=torch.Generator().manual_seed(3), **kw)
        assert cached.shape == (2, 4, SHAPE.tokens, SHAPE.enc_dim)
        torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)


def test_planning_rollout_commits_the_context_once_and_matches_the_reference_at_every_horizon():
    """A context committed once (batch 1) and shared by S candidates, H x K passes per call (a frame committed with
    the next frame's first step, nothing after the last): equal to the uncached reference, any horizon inside the
    window, with the same shared noise."""
    from trainer.sampling import generate, prefill

    m = _model()
    S, Tc, window = 3, 2, 7
    z, _, _, a, v = _inputs(B=S, T=window)
    ctx = z[:1, :Tc]
    a[:, :Tc], v[:, :Tc] = a[:1, :Tc], v[:1, :Tc]  # one context: the actions that led into it are shared too
    for horizon in range(1, window - Tc + 1):
        for k in (1, 4):
            calls = []
            real = m.denoise

            def counting(*args, real=real, calls=calls, **kw):
                calls.append(args[0].shape[1])
                return real(*args, **kw)

            m.denoise = counting
            g = torch.Generator().manual_seed(5)
            pre = prefill(m, ctx, a[:1], v[:1], ctx_noise=0.1, window=window, generator=g, shared_noise=True)
            assert calls == [Tc]  # the whole context in one pass
            got = generate(m, pre.expand(S), a[:, :Tc + horizon], v[:, :Tc + horizon], horizon=horizon, k=k,
                           ctx_noise=0.1, window=window, generator=g, shared_noise=True)
            del m.denoise
            assert len(calls) - 1 == horizon * k  # H x K passes
            assert calls[1:].count(2) == horizon - 1  # each generated frame but the last is committed with the next
            ref = rollout_uncached(m, ctx.expand(S, -1, -1, -1), a[:, :Tc + horizon], v[:, :Tc + horizon],
                                   horizon=horizon, k=k, ctx_noise=0.1, window=window,
                                   generator=torch.Generator().manual_seed(5), shared_noise=True)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_ring_cache_rollout_equals_the_reference_inside_the_window_and_keeps_h_x_k_passes_past_it():
    """The planner's preallocated, in-place cache (`cache="ring"`): from a batch-1 context shared by S rollouts,
    equal to the uncached reference at every horizon inside the window (K = 1 and 4, a null action among the
    planned ones); past the window it slides without re-committing (H x K passes, where "exact" adds a pass per
    frame), so it departs from the reference only there; differentiable (the gradient planner) with the same
    values as without gradients."""
    from trainer.sampling import RingKVCache, generate, prefill

    m = _model()
    S, Tc, window = 3, 2, 5
    z, _, _, a, v = _inputs(B=S, T=Tc + 8)
    ctx = z[:1, :Tc]
    a[:, :Tc], v[:, :Tc] = a[:1, :Tc], v[:1, :Tc]
    v[1, Tc + 1] = False

    def run(mode, horizon, k, actions=a, grad=False):
        calls = []
        real = m.denoise

        def counting(*args, real=real, **kw):
            calls.append(args[0].shape[1])
            return real(*args, **kw)

        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            pre = prefill(m, ctx, a[:1], v[:1], ctx_noise=0.1, window=window, generator=g, shared_noise=True)
        m.denoise = counting
        try:
            with torch.set_grad_enabled(grad):
                out = generate(m, pre, actions[:, :Tc + horizon], v[:, :Tc + horizon], horizon=horizon, k=k,
                               ctx_noise=0.1, window=window, generator=g, shared_noise=True, cache=mode)
        finally:
            del m.denoise
        return out, len(calls)

    for horizon in range(1, 9):
        for k in (1, 4):
            ring, ring_passes = run("ring", horizon, k)
            exact, exact_passes = run("exact", horizon, k)
            ref = rollout_uncached(m, ctx.expand(S, -1, -1, -1), a[:, :Tc + horizon], v[:, :Tc + horizon],
                                   horizon=horizon, k=k, ctx_noise=0.1, window=window,
                                   generator=torch.Generator().manual_seed(5), shared_noise=True)
            assert ring_passes == horizon * k
            inside = window - Tc  # frames generated before the window first slides
            torch.testing.assert_close(ring[:, :inside], ref[:, :inside], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(exact, ref, rtol=1e-4, atol=1e-4)
            if horizon > inside:
                assert exact_passes == horizon * k + (horizon - inside)  # one re-commit pass per slid frame
                assert (ring[:, inside:] - ref[:, inside:]).abs().max() > 1e-3  # an approximation there
    acts = a.clone().requires_grad_(True)
    with_grad, _ = run("ring", 7, 2, acts, grad=True)
    with_grad.pow(2).sum().backward()
    assert acts.grad[:, Tc:Tc + 7].abs().sum() > 0
    torch.testing.assert_close(with_grad.detach(), run("ring", 7, 2)[0], rtol=0, atol=0)
    with torch.no_grad():
        pre = prefill(m, z[:, :6], a, v, ctx_noise=0.1, window=window, generator=None)
    with pytest.raises(ValueError, match="batch 3 cannot start 2"):
        RingKVCache(pre, 2, window)
    # slots for what the rollout holds: its own frames while it fits the window, window + 1 once it slides
    short = prefill(m, ctx, a[:1], v[:1], ctx_noise=0.1, window=window, generator=None)
    assert [RingKVCache(short, S, window, frames=Tc + h).slots for h in (1, 2, 3, 4, 8)] == [3, 4, 5, 6, 6]

def test_model_config_is_validated():
    from pipeline.stage import UserError

    with pytest.raises(UserError, match="power of two"):
        ModelConfig(k_max=12)
    with pytest.raises(UserError, match="divide"):
        ModelConfig(dim=30, heads=4)
    with pytest.raises(UserError, match="shortcut and deterministic"):
        ModelConfig(kind="teacher_forced", conditioning="add")
    with pytest.raises(UserError, match="teacher-forced"):
        ModelConfig(kind="shortcut", conditioning="concat")
    from trainer.config import TrainConfig

    with pytest.raises(UserError, match=r"loss_weight_floor 0.0: must be in \(0, 1\]"):
        TrainConfig(loss_weight_floor=0.0)


def test_config_saved_by_an_older_wmctl_is_read_as_this_one_reads_it():
    """A run saved before a field was renamed or added resumes: `loss_weight` ramp/uniform is the floor 0.1/1, an
    absent field has the default the old code had built in; a real change is still named."""
    from pipeline.stage import to_jsonable
    from trainer.config import TrainConfig, config_from_dict, learned_differences

    new = to_jsonable(TrainConfig(loss_weight_floor=1.0))
    old = {k: v for k, v in new.items() if k not in ("loss_weight_floor", "state_weight")} | {"loss_weight": "uniform"}
    assert config_from_dict(old).loss_weight_floor == 1.0
    assert learned_differences(old, new) == []
    assert learned_differences(old | {"loss_weight": "ramp"}, new) == ["loss_weight_floor: 0.1 -> 1.0"]
    assert "gone: 1 -> '<absent>'" in learned_differences(old | {"gone": 1}, new)


def test_the_config_is_four_sections_each_checking_and_computing_its_own():
    """Every field of a training config but the model is in exactly one section (data, objective, optimisation,
    run); a section alone checks its fields as the whole config does and computes what it computes (the context and
    frameskip of a source, the signal-level cap, the learning rate) from the same values."""
    import dataclasses

    from pipeline.stage import UserError
    from trainer.config import TrainConfig, small
    from trainer.config_sections import DataConfig, ObjectiveConfig, OptimConfig, RunConfig, config_sections, section_of

    sections = config_sections()
    names = [n for fields in sections.values() for n in fields]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name != "model")
    assert len(names) == len(set(names))
    for cls, bad, match in ((DataConfig, {"context_frames": 1}, "context_frames"),
                            (ObjectiveConfig, {"ctx_noise": 2.0}, "ctx_noise"),
                            (OptimConfig, {"precision": "fp8"}, "precision"),
                            (RunConfig, {"keep_last": 0}, "keep_last")):
        with pytest.raises(UserError, match=match):
            getattr(cls(**bad), next(m for m in dir(cls) if m.startswith("check_")))()
        with pytest.raises(UserError, match=match):
            TrainConfig(**bad)
    cfg = dataclasses.replace(small(), context_schedule=((5, 12),), tau_max_schedule=((3, 0.5),),
                              source_frameskip=(("a", 3),))
    data, objective, optim = (section_of(cfg, n) for n in ("data", "objective", "optimisation"))
    assert [data.context_at(s) for s in (0, 5)] == [cfg.context_at(s) for s in (0, 5)] == [8, 12]
    assert (data.frameskip_of("a"), data.frameskip_of("b")) == (3, 2) and data.max_context() == 12
    assert objective.tau_max_at(4) == cfg.tau_max_at(4) == 0.5
    assert [optim.lr_at(s) for s in (0, 60, 1999)] == [cfg.lr_at(s) for s in (0, 60, 1999)]
    assert section_of(cfg, "run").log_every == cfg.log_every == 25


def test_a_run_derives_its_rate_and_mix_in_one_step_without_writing_into_the_config(pusht_store, tmp_path,
                                                                                      monkeypatch):
    """`trainer.derive.derive`: the config as the command built it stays as it was; what the run derives (the
    registry's and default mix weights, the frameskip) comes back apart, and `recorded` is the config it trains with
    and records; a resumed run's saved weights are kept unless the command gives its own."""
    import dataclasses

    from featurestore.reader import TokenReader
    from trainer.config import tiny
    from trainer.derive import Derived, derive

    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "pusht.toml").write_text('repo_id = "local/pusht"\nmix_weight = 0.25\n')
    monkeypatch.setenv("WMCTL_REGISTRY", str(registry))
    cfg = dataclasses.replace(tiny(), store=pusht_store)
    reader = TokenReader(pusht_store)
    got = derive(cfg, reader)
    assert got == Derived(frameskip=1, source_frameskip=(), action_kinds=(),
                          mix_weights=(("pusht", 0.25), ("pusht-free", 1.0)))
    assert cfg.mix_weights == () and got.recorded(cfg).mix_weights == got.mix_weights
    assert got.rated(cfg).mix_weights == ()
    saved = (("pusht", 0.5), ("pusht-free", 0.5))
    assert derive(cfg, reader, saved_mix=saved).mix_weights == saved
    given = dataclasses.replace(cfg, mix_weights=(("pusht", 2.0),))
    assert derive(given, reader, saved_mix=saved).mix_weights == (("pusht", 2.0), ("pusht-free", 1.0))
    assert derive(dataclasses.replace(cfg, labelled_fraction=0.5), reader).mix_weights == ()


PSHAPE = TokenShape(cameras=2, grid=(4, 4), enc_dim=8, action_dim=3, state_dim=2)


def _proprio_model(kind: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().model, kind=kind, **kw)
    m = ShortcutDynamics(cfg, PSHAPE) if kind == "shortcut" else TeacherForcedPredictor(cfg, PSHAPE)
    return m.eval()


@pytest.mark.parametrize("kind", ["shortcut", "teacher_forced"])
def test_proprio_state_token_is_predicted_causally_and_its_padding_stays_zero(kind):
    m = _proprio_model(kind, merge_2x2=True)
    g = torch.Generator().manual_seed(4)
    B, T = 2, 5
    z = pack_state(torch.randn(B, T, PSHAPE.tokens, 8, generator=g), torch.randn(B, T, 2, generator=g), PSHAPE)
    z[..., -1, 2:] = torch.randn(B, T, 6, generator=g)  # noise in the padding (as a noised latent has) is ignored
    tau, d = torch.rand(B, T, generator=g), torch.full((B, T), 0.25)
    a, v = torch.randn(B, T, 3, generator=g), torch.ones(B, T, dtype=torch.bool)
    run = (lambda z_: m(z_, tau, d, a, v)) if kind == "shortcut" else (lambda z_: m(z_, a, v))
    out = run(z)
    assert out.shape == (B, T, PSHAPE.latent_tokens, 8)
    assert out[..., -1, 2:].abs().max() == 0  # the state token's padding is exactly zero
    z2 = z.clone()
    z2[..., -1, 2:] = 0.0
    torch.testing.assert_close(run(z2), out)  # ... and never read
    z3 = z.clone()
    z3[:, 3:, -1, :2] += 1.0  # a later state changes nothing before it, and does change the state after it
    out3 = run(z3)
    torch.testing.assert_close(out3[:, :3], out[:, :3], rtol=0, atol=1e-5)
    assert (out3[:, 3, -1, :2] - out[:, 3, -1, :2]).abs().max() > 1e-4
    assert (out3[:, 3, :-1] - out[:, 3, :-1]).abs().max() > 1e-4  # the patches see the state


def test_proprio_cached_rollout_equals_uncached_and_generates_the_state():
    m = _proprio_model("shortcut")
    g = torch.Generator().manual_seed(5)
    z = pack_state(torch.randn(2, 7, PSHAPE.tokens, 8, generator=g), torch.randn(2, 7, 2, generator=g), PSHAPE)
    a, v = torch.randn(2, 7, 3, generator=g), torch.ones(2, 7, dtype=torch.bool)
    kw = dict(horizon=4, k=4, ctx_noise=0.1, window=7)
    cached = rollout_cached(m, z[:, :3], a, v, generator=torch.Generator().manual_seed(3), **kw)
    ref = rollout_uncached(m, z[:, :3], a, v, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
    assert cached[..., -1, 2:].abs().max() == 0 and cached[..., -1, :2].abs().min() > 0


def test_frame_error_weighs_the_state_against_the_patches():
    g = torch.Generator().manual_seed(6)
    patches, state = torch.randn(2, 3, PSHAPE.tokens, 8, generator=g), torch.randn(2, 3, 2, generator=g)
    diff = pack_state(patches, state, PSHAPE)
    want = patches.pow(2).mean((2, 3)) + 0.5 * state.pow(2).mean(-1)
    torch.testing.assert_close(frame_error(diff, PSHAPE, 0.5), want)
    torch.testing.assert_close(frame_error(patches, SHAPE), patches.pow(2).mean((2, 3)))  # no state: plain MSE
    p, s = split_state(diff, PSHAPE)
    torch.testing.assert_close(p, patches)
    torch.testing.assert_close(s, state)


@pytest.mark.parametrize("k", [1, 4])
@torch.no_grad()
def test_rollout_of_three_windows_slides_and_stays_equal_to_the_uncached_reference_at_every_step(k):
    """Past the trained window the cached rollout re-commits the last window - 1 frames from position 0, so every
    prediction sees what training saw; it equals the uncached reference (which recomputes each window) at every
    one of 3x window steps, for a context longer than the window too."""
    m = _model()
    window = 4
    for Tc in (2, 6):
        H = 3 * window
        z, _, _, a, v = _inputs(B=2, T=Tc + H)
        kw = dict(horizon=H, k=k, ctx_noise=0.1, window=window)
        cached = rollout_cached(m, z[:, :Tc], a, v, generator=torch.Generator().manual_seed(3), **kw)
        ref = rollout_uncached(m, z[:, :Tc], a, v, generator=torch.Generator().manual_seed(3), **kw)
        err = (cached - ref).abs().amax(dim=(0, 2, 3))
        assert err.shape == (H,) and float(err.max()) < 1e-4, err
        assert cached.abs().max() < 50  # a sane scale, not a blown-up regime nothing trained
        # positions matter: an unbounded window (what the cache did before) gives different frames past it
        free = rollout_cached(m, z[:, :Tc], a, v, generator=torch.Generator().manual_seed(3),
                              **{**kw, "window": Tc + H})
        assert (free[:, -1] - cached[:, -1]).abs().max() > 1e-3


SLOTTED = TokenShape(cameras=3, grid=(2, 2), enc_dim=8, action_dim=3, state_dim=2,
                     slots=("exterior_1", "exterior_2", "wrist"))


@pytest.mark.parametrize("kind,kw", [("shortcut", {}), ("shortcut", {"merge_2x2": True}),
                                     ("teacher_forced", {}), ("teacher_forced", {"conditioning": "concat"})])
def test_an_absent_camera_slot_is_masked_exactly_like_a_missing_camera(kind, kw):
    """A training batch mixes a 3-camera robot with a 2-camera one (slot 1 absent): for the 2-camera sample,
    the masked slot changes nothing (whatever its tokens hold), and its outputs equal those of the same model
    run on that robot's two cameras alone (what eval and planning do); the 3-camera sample is unaffected."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().model, kind=kind, **kw)
    m = (ShortcutDynamics(cfg, SLOTTED) if kind == "shortcut" else TeacherForcedPredictor(cfg, SLOTTED)).eval()
    with torch.no_grad():
        m.io.camera.normal_()  # (zero at initialisation: trained slot embeddings differ)
    g = torch.Generator().manual_seed(3)
    B, T, P = 2, 3, 4
    z = torch.randn(B, T, SLOTTED.latent_tokens, 8, generator=g)
    z[..., -1, 2:] = 0  # the state token's padding
    tau, d = torch.rand(B, T, generator=g), torch.full((B, T), 0.25)
    a, v = torch.randn(B, T, 3, generator=g), torch.ones(B, T, dtype=torch.bool)
    present = torch.tensor([[True, False, True], [True, True, True]])

    def run(rows, z_, c):
        if kind == "shortcut":
            return m(z_, tau[rows], d[rows], a[rows], v[rows], layout=c)
        return m(z_, a[rows], v[rows], layout=c)

    both = slice(0, 2)
    masked = run(both, z, FrameLayout(None, present))
    keep = [*range(P), *range(2 * P, 3 * P), 3 * P]  # cameras 0 and 2, then the state token
    z2 = z.clone()
    z2[0, :, P:2 * P] = 100 * torch.randn(T, P, 8, generator=g)  # whatever the absent slot holds
    torch.testing.assert_close(run(both, z2, FrameLayout(None, present))[0, :, keep], masked[0, :, keep], rtol=0,
                               atol=1e-5)
    alone = run(slice(0, 1), z[:1, :, keep], FrameLayout((0, 2)))
    torch.testing.assert_close(masked[0, :, keep], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masked[1], run(slice(1, 2), z[1:], FrameLayout())[0], rtol=1e-4, atol=1e-5)
    # the slot embedding says which camera it is: the same tokens in another slot give another answer
    other = run(slice(0, 1), z[:1, :, keep], FrameLayout((1, 2)))
    assert (other - alone).abs().max() > 1e-3


def test_the_loss_counts_only_the_cameras_a_sample_has():
    diff = torch.zeros(2, 1, SLOTTED.latent_tokens, 8)
    diff[:, :, 4:8] = 5.0  # slot 1 wrong everywhere
    diff[:, :, :4] = 1.0
    present = torch.tensor([[True, False, True], [True, True, True]])
    err = frame_error(diff, SLOTTED, 1.0, FrameLayout(None, present))
    assert err[0, 0] == pytest.approx((1.0 + 0.0) / 2)  # slots 0 and 2 only
    assert err[1, 0] == pytest.approx((1.0 + 25.0 + 0.0) / 3)
    # two robots: a 1-D state (sample 0) and a 2-D one (sample 1); the narrower one's second channel is not its
    two = dataclasses.replace(SLOTTED, embodiments=(("arm", 1), ("franka", 2)),
                              source_embodiment=(("arm", 0), ("droid", 1)))
    diff[:, :, -1, :2] = torch.tensor([2.0, 7.0])
    err = frame_error(diff, two, 0.5, FrameLayout(None, present, torch.tensor([0, 1])))
    assert err[0, 0] == pytest.approx(0.5 + 0.5 * 4.0)
    assert err[1, 0] == pytest.approx(26.0 / 3 + 0.5 * (4.0 + 49.0) / 2)


@pytest.mark.parametrize("kind,kw", [("shortcut", {}), ("teacher_forced", {}),
                                     ("teacher_forced", {"conditioning": "concat"})])
def test_two_robots_share_the_state_token_by_embodiment(kind, kw):
    """A 2-D robot and a 1-D one in one model: each sample's state in the state token's first channels, the
    narrower robot's second channel never predicted (0, as in its inputs, so a rollout feeds back nothing
    unseen), the embodiment embedding telling them apart, a mixed batch equal to each robot's own calls; a
    cached rollout on one robot keeps its padding at 0."""
    two = dataclasses.replace(SLOTTED, embodiments=(("franka", 2), ("arm", 1)),
                              source_embodiment=(("arm", 1), ("droid", 0)))
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny().model, kind=kind, **kw)
    m = (ShortcutDynamics(cfg, two) if kind == "shortcut" else TeacherForcedPredictor(cfg, two)).eval()
    with torch.no_grad():
        m.io.embodiment.normal_()  # (zero at initialisation)
    g = torch.Generator().manual_seed(5)
    B, T = 2, 3
    z = torch.randn(B, T, two.latent_tokens, 8, generator=g)
    z[..., -1, 2:] = 0
    z[1, :, -1, 1] = 0  # the 1-D robot's state
    tau, d = torch.rand(B, T, generator=g), torch.full((B, T), 0.25)
    a, v = torch.randn(B, T, 3, generator=g), torch.ones(B, T, dtype=torch.bool)

    def run(rows, z_, layout):
        if kind == "shortcut":
            return m(z_, tau[rows], d[rows], a[rows], v[rows], layout=layout)
        return m(z_, a[rows], v[rows], layout=layout)

    mixed = run(slice(0, 2), z, FrameLayout(embodiment=torch.tensor([0, 1])))
    assert (mixed[1, :, -1, 1:] == 0).all() and (mixed[0, :, -1, :2] != 0).all() and (mixed[:, :, -1, 2:] == 0).all()
    torch.testing.assert_close(mixed[0], run(slice(0, 1), z[:1], FrameLayout(embodiment=0))[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], run(slice(1, 2), z[1:], FrameLayout(embodiment=1))[0], rtol=1e-4, atol=1e-5)
    other = run(slice(1, 2), z[1:], FrameLayout(embodiment=0))  # the same inputs said to be the other robot
    assert (other[0, :, -1, 0] - mixed[1, :, -1, 0]).abs().max() > 1e-4
    if kind == "shortcut":
        out = rollout_cached(m, z[1:, :2], a[1:], v[1:], horizon=1, k=2, window=4,
                             generator=torch.Generator().manual_seed(0), layout=FrameLayout(embodiment=1))
        assert out.shape == (1, 1, two.latent_tokens, 8) and (out[..., -1, 1:] == 0).all()


def test_a_captured_rollout_of_a_slotted_two_robot_model_reads_no_host_data():
    """`CapturedRollout` on one source's cameras (a subset of the slots, out of order) and the narrower of two
    robots: equal to the plain ring-cache rollout, and nothing in it copies host data to the device or reads a
    device value back (`capture_audit`), so the CUDA graph of a real source's rollout can be captured."""
    from capture_audit import HostDataAudit

    from trainer.sampling import CapturedRollout, frame_noise, generate, prefill

    two = dataclasses.replace(SLOTTED, embodiments=(("franka", 2), ("arm", 1)),
                              source_embodiment=(("arm", 1), ("droid", 0)))
    torch.manual_seed(0)
    m = ShortcutDynamics(tiny().model, two).eval()
    layout = FrameLayout(slots=(2, 0), embodiment=1)  # the wrist and the first exterior camera of the arm
    S, Tc, H, window = 4, 2, 3, 6
    g = torch.Generator().manual_seed(3)
    N = 2 * 4 + 1  # two cameras of 2x2 tokens and the state
    ctx = torch.randn(1, Tc, N, 8, generator=g)
    ctx[..., -1, 1:] = 0
    a, v = torch.randn(S, Tc + H, 3, generator=g), torch.ones(S, Tc + H, dtype=torch.bool)
    a[:, :Tc] = a[:1, :Tc]
    with torch.no_grad():
        pre = prefill(m, ctx, a[:1], v[:1], ctx_noise=0.1, window=window, generator=g, shared_noise=True,
                      layout=layout)
        state = g.get_state()
        want = generate(m, pre, a, v, horizon=H, k=2, ctx_noise=0.1, window=window, generator=g, shared_noise=True,
                        cache="ring", layout=layout)
        g.set_state(state)
        noise = frame_noise(S, H, (N, 8), g, device="cpu", dtype=torch.float32, shared_noise=True)
        graph = CapturedRollout(m, pre, a, v, noise, horizon=H, k=2, ctx_noise=0.1, window=window, layout=layout,
                                capture=False)
        torch.testing.assert_close(graph(pre, a, v, noise), want, rtol=0, atol=0)
        assert (want[..., -1, 1:] == 0).all()  # the arm's one state channel, the padding kept at zero
        audit = HostDataAudit()
        with audit:
            graph._run()
    assert audit.seen == []
