"""Autoregressive generation: K shortcut steps per frame, context re-noised to tau_ctx, KV cache in time.

For each new frame: start from noise, take K steps of size 1/K (x-prediction: v = (z1_hat - x) / (1 - tau),
x <- x + v / K), then commit it. Context frames are seen slightly noised, z_ctx = (1 - ctx_noise) z + ctx_noise
eps with eps drawn once per frame (signal level 1 - ctx_noise, Dreamer 4 uses 0.1 noise).

Rollouts stay inside what training saw: a prediction attends to at most `window` frames (the training window)
at time positions 0..window-1, the first of them without a predecessor, as in a training window. Longer
rollouts slide that window. `rollout_uncached` recomputes the window for every step (the reference);
`rollout_cached` keeps the keys/values of the time-attention layers for committed frames, so each step costs one
frame while the rollout fits the window, and one re-commit pass of the last window - 1 frames per frame after it
slides. The two are equal at every step, inside the window and past it (tested at 3x the window).
The planner's rollouts use `RingKVCache` (preallocated slots written in place) and, on CUDA, `CapturedRollout`
(one candidate batch's whole rollout replayed as a CUDA graph).
Every function takes `layout` (`trainer.tokens.FrameLayout`): the camera slots the latents hold (a source's own
cameras at inference), passed to each network call.
Legend: B = batch, T = frames, H = horizon, N = tokens, Z = width, A = action.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.kv_cache import Prefill, RingKVCache, TimeKVCache
from trainer.model.baseline import TeacherForcedPredictor
from trainer.model.dynamics import ShortcutDynamics
from trainer.tokens import FULL_FRAME, FrameLayout


def _frame_forward(model: ShortcutDynamics, z_BTNZ, tau_BT, d_BT, act_BTA, valid_BT, cache: TimeKVCache, pos: int,
                   commit: int, prev, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """One pass over T consecutive frames from time position `pos` (frame-causal), `commit` of them kept."""
    angles = model.time_angles(z_BTNZ.shape[1], offset=pos, device=z_BTNZ.device)
    z_BTNZ = z_BTNZ.contiguous()  # broadcast contexts and shared noise come in expanded (one compiled variant)
    return model.denoise(z_BTNZ, tau_BT, d_BT, act_BTA, valid_BT, prev=prev, pos=pos,
                         time_kv=cache.for_pass(angles, pos, z_BTNZ.shape[1], commit), layout=layout)


def _prepare(context_BTNZ, actions_BTA, valid_BT, horizon):
    B, Tc = context_BTNZ.shape[:2]
    if actions_BTA is None:
        actions_BTA = torch.zeros(B, Tc + horizon, 0, device=context_BTNZ.device)
        valid_BT = torch.zeros(B, Tc + horizon, dtype=torch.bool, device=context_BTNZ.device)
    if actions_BTA.shape[1] != Tc + horizon or valid_BT.shape[1] != Tc + horizon:
        raise ValueError(f"actions must cover context + horizon = {Tc + horizon} frames, got {actions_BTA.shape[1]}")
    return actions_BTA, valid_BT


def sampling_steps(kind: str, k: int, generator: torch.Generator | None) -> tuple[int, torch.Generator | None]:
    """(sampling steps, noise generator) for a model kind: the deterministic control takes one step from nothing
    (no generator: zeros), whatever K the caller asked of a sampler."""
    return (1, None) if kind == "deterministic" else (k, generator)


def _noise(shape, generator, device, dtype, shared: bool = False):
    """Gaussian noise; `shared` draws one sample and repeats it over the batch (common random numbers: every
    candidate action sequence of a planner meets the same noise, so their costs differ by the actions only).
    No generator: zeros (the deterministic control starts every frame from 0 and sees a clean context)."""
    if generator is None:
        return torch.zeros(shape, device=device, dtype=dtype)
    draw = (1, *shape[1:]) if shared else shape
    n = torch.randn(draw, generator=generator, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)
    return n.expand(shape) if shared else n


def compile_for_rollouts(model: ShortcutDynamics | TeacherForcedPredictor) -> None:
    """torch.compile the per-frame network call the rollouts make (`denoise` of the shortcut model, `forward`
    of the teacher-forced one), in place, with dynamic shapes: the KV cache grows by a frame per step and
    the batch changes between planners. Default inductor mode on CPU and GPU alike: CUDA graphs
    ("reduce-overhead") are not used, because the cached keys/values are outputs of one call kept for the
    next, which a graph replay would overwrite. The first call of each shape compiles (tens of seconds on CPU).
    A cached rollout meets about 6 variants (the first frame has no temporal prior; committing or not; the
    cache filling or full), twice with gradients (the gradient planner): the recompile limit is raised to
    fit them, else dynamo falls back to eager after 8. Compiled code is cached per function, not per model:
    call `torch._dynamo.reset()` before compiling a second model in one process."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    name = "denoise" if isinstance(model, ShortcutDynamics) else "forward"
    setattr(model, name, torch.compile(getattr(model, name), dynamic=True))


def _commit_window(model: ShortcutDynamics, frames: list[torch.Tensor], start: int, actions_BTA, valid_BT, *,
                   ctx_noise: float, layout: FrameLayout = FULL_FRAME) -> Prefill:
    """Keys/values of committed frames (already at the context noise level) in one pass from time position 0,
    the first of them without a predecessor: exactly how training and the uncached reference see a window."""
    zc = torch.cat(frames, dim=1)
    B, T = zc.shape[:2]
    tau = torch.full((B, T), 1 - ctx_noise, device=zc.device, dtype=zc.dtype)
    d = torch.full((B, T), 1.0 / model.cfg.k_max, device=zc.device, dtype=zc.dtype)
    cache = TimeKVCache()
    _frame_forward(model, zc, tau, d, actions_BTA[:, start:start + T], valid_BT[:, start:start + T], cache, 0, T,
                   None, layout)
    return Prefill(cache, frames, start, 1 - ctx_noise)


def prefill(model: ShortcutDynamics, context_BTNZ: torch.Tensor, actions_BTA: torch.Tensor, valid_BT: torch.Tensor, *,
            ctx_noise: float, window: int, generator: torch.Generator | None, shared_noise: bool = False,
            layout: FrameLayout = FULL_FRAME) -> Prefill:
    """Commit the clean context [B, Tc, N, Z] in one pass: each frame re-noised once to the context level, the
    frames attending causally to each other. Of a context longer than the window, the last `window - 1` frames
    (what the first generated frame may see). actions/valid cover at least the context frames. A None
    generator: no noise (the deterministic control)."""
    B, Tc, N, Zd = context_BTNZ.shape
    dev, dt = context_BTNZ.device, context_BTNZ.dtype
    frames = [(1 - ctx_noise) * context_BTNZ[:, t:t + 1] + ctx_noise * _noise((B, 1, N, Zd), generator, dev, dt,
                                                                               shared_noise) for t in range(Tc)]
    start = max(0, Tc - window + 1)
    return _commit_window(model, frames[start:], start, actions_BTA, valid_BT, ctx_noise=ctx_noise, layout=layout)


def generate(model: ShortcutDynamics, pre: Prefill, actions_BTA: torch.Tensor, valid_BT: torch.Tensor, *,
             horizon: int, k: int = 4, ctx_noise: float = 0.1, window: int, generator: torch.Generator | None,
             shared_noise: bool = False, cache: str = "exact", layout: FrameLayout = FULL_FRAME,
             noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """`horizon` frames after a committed context (of batch 1, shared by every rollout, or of the actions'
    batch), K steps of 1/K each, H x K passes while the rollout fits the window: a generated frame is committed
    (re-noised to the context level, its keys/values kept) in the same pass as the next frame's first step,
    and nothing runs after the last frame. actions[:, t] leads into frame t. Returns [B, H, N, Z].

    Past the window, `cache="exact"` (eval's) slides it: the last `window - 1` committed frames are
    re-committed from time position 0 (one pass) before each new frame, so every prediction sees at most
    `window` frames at the positions training used (equal to `rollout_uncached`). `cache="ring"` (the
    planner's) keeps keys/values in preallocated slots written in place and slides without re-committing
    (`RingKVCache`: equal to "exact" inside the window, H x K passes at any horizon).
    `noise`: where the frames' noise comes from, one [B, 1, N, Z] draw per call in the order the rollout takes
    them (each frame's start, then its re-noising to the context level; `frame_noise` draws them ahead); by
    default drawn from `generator` as it goes."""
    _check_generate(model, k, cache)
    B = actions_BTA.shape[0]
    z_prev = pre.committed[-1]
    _, _, N, Zd = z_prev.shape
    dev, dt = z_prev.device, z_prev.dtype
    pre, kv, prev = _rollout_cache(pre, B, window, horizon, cache)
    full = lambda v, n=1: torch.full((B, n), v, device=dev, dtype=dt)  # noqa: E731
    draw = noise or (lambda: _noise((B, 1, N, Zd), generator, dev, dt, shared_noise))
    ctx_tau, d_min = 1 - ctx_noise, 1.0 / model.cfg.k_max
    committed, start = list(pre.committed), pre.start
    pending = None
    out = []
    for h in range(horizon):
        t = pre.frames + h
        if cache == "exact" and pending is not None and t - start + 1 > window:  # slide: the oldest frame leaves
            committed = (committed + [pending])[-(window - 1):]
            start = t - len(committed)
            slid = _commit_window(model, committed, start, actions_BTA, valid_BT, ctx_noise=ctx_noise, layout=layout)
            kv, prev, pending = slid.cache, slid.prev, None
        x = draw()
        a, v = actions_BTA[:, t:t + 1], valid_BT[:, t:t + 1]
        for s in range(k):
            tau = s / k
            if pending is not None:  # commit the frame before together with this frame's first step
                both = torch.cat([pending, x], dim=1)
                taus, ds = torch.cat([full(ctx_tau), full(tau)], 1), torch.cat([full(d_min), full(1.0 / k)], 1)
                pred = _frame_forward(model, both, taus, ds, actions_BTA[:, t - 1:t + 1], valid_BT[:, t - 1:t + 1],
                                      kv, t - 1 - start, 1, prev, layout)[:, 1:]
                committed.append(pending)
                prev, pending = (both[:, :1], full(ctx_tau)), None
            else:
                pred = _frame_forward(model, x, full(tau), full(1.0 / k), a, v, kv, t - start, 0, prev, layout)
            x = x + (pred - x) / (1 - tau) / k
        out.append(x)
        if h < horizon - 1:
            pending = (1 - ctx_noise) * x + ctx_noise * draw()
    return torch.cat(out, dim=1)


def _check_generate(model: ShortcutDynamics, k: int, cache: str) -> None:
    """`generate`'s K (a power of two the model's step grid has) and cache kind, or ValueError."""
    if k < 1 or k & (k - 1) or k > model.cfg.k_max:
        raise ValueError(f"k={k} must be a power of two <= k_max={model.cfg.k_max}")
    if cache not in ("exact", "ring"):
        raise ValueError(f"cache={cache!r}: exact or ring")


def _rollout_cache(pre: Prefill, batch: int, window: int, horizon: int, cache: str
                   ) -> tuple[Prefill, TimeKVCache | RingKVCache, tuple[torch.Tensor, ...]]:
    """The prefill `generate` goes on from, the cache its passes write and the first frame's temporal prior:
    `cache="ring"`, preallocated slots for `batch` rollouts (the prefill as it is); "exact", the prefill's own
    cache, the prefill expanded to `batch` first when it is of batch 1."""
    if cache == "ring":
        kv: TimeKVCache | RingKVCache = RingKVCache(pre, batch, window, frames=len(pre.committed) + horizon,
                                                    inplace=not torch.is_grad_enabled())
        prev = tuple(x.expand(batch, *x.shape[1:]) for x in pre.prev)
    else:
        pre = pre.expand(batch) if pre.committed[-1].shape[0] != batch else pre
        kv, prev = pre.cache, pre.prev
    return pre, kv, prev


def frame_noise(batch: int, horizon: int, frame_shape: tuple[int, int], generator: torch.Generator | None, *,
                device, dtype, shared_noise: bool = False) -> list[torch.Tensor]:
    """The 2H - 1 noise draws of a `horizon`-frame `generate`, in its order (frame 0's start, its re-noising,
    frame 1's start, ...; the last frame is not re-noised): the same values it draws from `generator` itself."""
    shape = (batch, 1, *frame_shape)
    return [_noise(shape, generator, device, dtype, shared_noise) for _ in range(2 * horizon - 1)]


class CapturedRollout:
    """The planner's rollout of one shape (S candidates, H frames, K steps, the context's length) as a CUDA
    graph: one MPC step's rollouts replay a fixed sequence of kernels with no Python and no launches in between.

    Everything the rollout reads lives in static buffers refilled before each call: the committed context (the
    keys/values and frames of a `Prefill` of batch 1), the candidates' actions and the noise draws
    (`frame_noise`). What else it depends on, the ring cache's slot schedule and masks, time positions and
    signal levels, is fixed by the shape and baked in at capture; the ring cache's slots are allocated inside
    the graph and rewritten by every replay. A graph is captured once per shape and reused across MPC steps
    (a new context is copied in, not re-captured). `capture=False` runs the same code on the same buffers
    eagerly (the CPU, and the check that it equals the plain rollout, `tests/test_cli_plan.py`).
    Inference only (no gradients): the gradient planner stays eager."""

    def __init__(self, model: ShortcutDynamics, pre: Prefill, actions_BTA: torch.Tensor, valid_BT: torch.Tensor,
                 noise: list[torch.Tensor], *, horizon: int, k: int, ctx_noise: float, window: int,
                 layout: FrameLayout = FULL_FRAME, capture: bool = True):
        if pre.committed[0].shape[0] != 1:
            raise ValueError("a captured rollout starts from a shared context (a prefill of batch 1)")
        self.model = model
        self.kw = dict(horizon=horizon, k=k, ctx_noise=ctx_noise, window=window, layout=layout)
        cache = TimeKVCache()
        cache.k = {layer: x.clone() for layer, x in pre.cache.k.items()}
        cache.v = {layer: x.clone() for layer, x in pre.cache.v.items()}
        self.pre = Prefill(cache, [z.clone() for z in pre.committed], pre.start, pre.tau)
        self.actions, self.valid = actions_BTA.clone(), valid_BT.clone()
        self.noise = [n.clone() for n in noise]
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            side = torch.cuda.Stream()  # warm up off the capturing stream, as CUDA graphs ask (kernels, handles,
            side.wait_stream(torch.cuda.current_stream())  # the slot masks' cache)
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.out = self._run()

    def _run(self) -> torch.Tensor:
        draws = iter(self.noise)
        return generate(self.model, self.pre, self.actions, self.valid, generator=None, noise=lambda: next(draws),
                        cache="ring", **self.kw)

    def fits(self, pre: Prefill, actions_BTA: torch.Tensor) -> bool:
        """Whether this graph runs a rollout of that context and those actions (same shapes, same window start)."""
        mine = self.pre
        return (actions_BTA.shape == self.actions.shape and pre.start == mine.start and pre.tau == mine.tau
                and len(pre.committed) == len(mine.committed) and pre.committed[0].shape == mine.committed[0].shape)

    def __call__(self, pre: Prefill, actions_BTA: torch.Tensor, valid_BT: torch.Tensor,
                 noise: list[torch.Tensor]) -> torch.Tensor:
        """[S, H, N, Z] for this MPC step's context (`pre`, batch 1), actions and noise draws."""
        if not self.fits(pre, actions_BTA):
            raise ValueError("this captured rollout is of another shape (candidates, horizon or context)")
        with torch.no_grad():
            for src, dst in ((pre.cache.k, self.pre.cache.k), (pre.cache.v, self.pre.cache.v)):
                for layer, x in src.items():
                    dst[layer].copy_(x)
            for z, mine in zip(pre.committed, self.pre.committed):
                mine.copy_(z)
            self.actions.copy_(actions_BTA)
            self.valid.copy_(valid_BT)
            for n, mine in zip(noise, self.noise):
                mine.copy_(n)
            if self.graph is None:
                return self._run()
            self.graph.replay()
            return self.out.clone()  # the next replay overwrites the graph's output


def rollout_cached(model: ShortcutDynamics, context_BTNZ: torch.Tensor, actions_BTA: torch.Tensor | None,
                   valid_BT: torch.Tensor | None, *, horizon: int, k: int = 4, ctx_noise: float = 0.1,
                   window: int, generator: torch.Generator, shared_noise: bool = False,
                   layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """Generate `horizon` frames after the clean context [B, Tc, N, Z]. actions[:, t] leads into frame t
    (covering context + horizon); valid=False means the null action. Returns [B, H, N, Z]. Differentiable
    (callers that need no gradient wrap it in torch.no_grad())."""
    actions_BTA, valid_BT = _prepare(context_BTNZ, actions_BTA, valid_BT, horizon)
    pre = prefill(model, context_BTNZ, actions_BTA, valid_BT, ctx_noise=ctx_noise, window=window,
                  generator=generator, shared_noise=shared_noise, layout=layout)
    return generate(model, pre, actions_BTA, valid_BT, horizon=horizon, k=k, ctx_noise=ctx_noise, window=window,
                    generator=generator, shared_noise=shared_noise, layout=layout)


def rollout_uncached(model: ShortcutDynamics, context_BTNZ: torch.Tensor, actions_BTA: torch.Tensor | None,
                     valid_BT: torch.Tensor | None, *, horizon: int, k: int = 4, ctx_noise: float = 0.1,
                     window: int, generator: torch.Generator, shared_noise: bool = False,
                     layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """The reference: the same generation, recomputing the last `window` frames (from time position 0, the first
    without a predecessor) at every step.
    Draws noise in the same order as `rollout_cached`, so the two agree for the same generator."""
    actions_BTA, valid_BT = _prepare(context_BTNZ, actions_BTA, valid_BT, horizon)
    B, Tc, N, Zd = context_BTNZ.shape
    dev, dt = context_BTNZ.device, context_BTNZ.dtype
    d_min = 1.0 / model.cfg.k_max
    ctx = [(1 - ctx_noise) * context_BTNZ[:, t:t + 1]
           + ctx_noise * _noise((B, 1, N, Zd), generator, dev, dt, shared_noise) for t in range(Tc)]
    out = []
    for h in range(horizon):
        t = Tc + h
        lo = max(0, t - window + 1)
        x = _noise((B, 1, N, Zd), generator, dev, dt, shared_noise)
        n_ctx = t - lo
        for s in range(k):
            tau = s / k
            z = torch.cat(ctx[lo:t] + [x], dim=1)
            taus = torch.tensor([1 - ctx_noise] * n_ctx + [tau], device=dev, dtype=dt).expand(B, -1)
            ds = torch.tensor([d_min] * n_ctx + [1.0 / k], device=dev, dtype=dt).expand(B, -1)
            pred = model(z, taus, ds, actions_BTA[:, lo:t + 1], valid_BT[:, lo:t + 1], layout=layout)[:, -1:]
            x = x + (pred - x) / (1 - tau) / k
        out.append(x)
        ctx.append((1 - ctx_noise) * x + ctx_noise * _noise((B, 1, N, Zd), generator, dev, dt, shared_noise))
    return torch.cat(out, dim=1)


def rollout_teacher_forced(model: TeacherForcedPredictor, context_BTNZ: torch.Tensor, actions_BTA, valid_BT, *,
                           horizon: int, window: int, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """Feed predictions back: frame t+1 = g(last `window` frames, the actions after them)."""
    actions_BTA, valid_BT = _prepare(context_BTNZ, actions_BTA, valid_BT, horizon)
    seq = [context_BTNZ[:, t:t + 1] for t in range(context_BTNZ.shape[1])]
    Tc = len(seq)
    for h in range(horizon):
        t = Tc + h  # frame to predict; inputs are frames lo..t-1 with the actions leading out of them
        lo = max(0, t - window)
        z = torch.cat(seq[lo:t], dim=1)
        pred = model(z, actions_BTA[:, lo + 1:t + 1], valid_BT[:, lo + 1:t + 1], layout=layout)[:, -1:]
        seq.append(pred)
    return torch.cat(seq[Tc:], dim=1)
