"""Dreamer-4-style block-causal shortcut dynamics over frozen encoder tokens (architecture only).

Per frame the sequence is `[registers | latent tokens | (state token) | shortcut token (tau, d) | action token]`.
With proprioception on (`TokenShape.state_dim > 0`, as DINO-WM), the normalised robot state travels as one
more latent token (its first S channels; the rest are zero), is noised and generated with the patches and
predicted like them, so a rollout predicts the state too and a planner can put a cost on it. Every
layer attends within a frame (space, 2-D RoPE over the patch grid); every `time_every`-th layer also
attends causally across frames at the same slot (time, 1-D RoPE), by rearranging (B, T, S) -> (B*S, T),
so frame t only ever sees frames <= t. The network predicts the clean latents (x-prediction).

Legend: B = batch, T = frames, N = latent tokens per frame (cameras x grid, + 1 state token with
proprioception), Q = model tokens for them (the patches / 4 with the 2x2 merge), S = R + Q + 2 tokens per frame,
D = model width, Z = encoder width, A = action.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

from trainer.config import ModelConfig
from trainer.model.common import Attention, RMSNorm, SwiGLU, rope_2d_angles, rope_angles
from trainer.tokens import FULL_FRAME, FrameLayout, TokenShape, mask_state, pack_state, split_state


def merge_2x2(z_BTND: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    """[B, T, C*gh*gw, Z] -> [B, T, C*(gh/2)*(gw/2), 4Z]: each 2x2 block of patches becomes one token (any
    number of cameras C)."""
    gh, gw = shape.grid
    return rearrange(z_BTND, "b t (c h i w j) z -> b t (c h w) (i j z)", h=gh // 2, i=2, w=gw // 2, j=2)


def unmerge_2x2(z_BTQM: torch.Tensor, shape: TokenShape) -> torch.Tensor:
    gh, gw = shape.grid
    return rearrange(z_BTQM, "b t (c h w) (i j z) -> b t (c h i w j) z", h=gh // 2, w=gw // 2, i=2, j=2)


def space_positions(shape: TokenShape, merged: bool, registers: int, trailing: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) per token of a frame `[registers | patches | trailing special tokens]`: special tokens at
    (0, 0), patches at 1.. on their camera's grid."""
    gh, gw = (shape.grid[0] // 2, shape.grid[1] // 2) if merged else shape.grid
    rows = torch.arange(gh).repeat_interleave(gw).repeat(shape.cameras) + 1
    cols = torch.arange(gw).repeat(gh).repeat(shape.cameras) + 1
    zeros_r, zeros_t = torch.zeros(registers, dtype=torch.long), torch.zeros(trailing, dtype=torch.long)
    return torch.cat([zeros_r, rows, zeros_t]), torch.cat([zeros_r, cols, zeros_t])


class Block(nn.Module):
    """Space attention (within a frame) on every layer, optional causal time attention, SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig, time: bool):
        super().__init__()
        kw = dict(qk_norm=cfg.qk_norm, softcap=cfg.softcap)
        self.norm_space = RMSNorm(cfg.dim)
        self.space = Attention(cfg.dim, cfg.heads, cfg.kv_heads, **kw)
        self.time = Attention(cfg.dim, cfg.heads, cfg.kv_heads, **kw) if time else None
        self.norm_time = RMSNorm(cfg.dim) if time else None
        self.norm_mlp = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)

    def forward(self, x_BTSD: torch.Tensor, space_angles: torch.Tensor, time_angles: torch.Tensor,
                time_kv=None, time_mask: torch.Tensor | None = None, space_keep_BS: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`space_keep_BS`: per sample, the tokens a frame's tokens may attend to (absent cameras' are not)."""
        B, T, S, D = x_BTSD.shape
        keep = None if space_keep_BS is None else \
            space_keep_BS[:, None, None, None, :].expand(B, T, 1, 1, S).reshape(B * T, 1, 1, S)
        h = self.space(self.norm_space(x_BTSD).reshape(B * T, S, D), angles=space_angles, mask_LM=keep)
        x_BTSD = x_BTSD + h.view(B, T, S, D)
        if self.time is not None:
            h = rearrange(self.norm_time(x_BTSD), "b t s d -> (b s) t d")
            kv = time_kv(self.time, h) if time_kv is not None else None  # KV cache hook (rollouts)
            if kv is not None and len(kv) == 3:  # a slotted cache says which slots each frame may see
                kv, time_mask = kv[:2], kv[2]
            h = self.time(h, angles=time_angles, causal=time_mask is None, mask_LM=time_mask, kv=kv)
            x_BTSD = x_BTSD + rearrange(h, "(b s) t d -> b t s d", b=B)
        return x_BTSD + self.mlp(self.norm_mlp(x_BTSD))


def sinusoidal(x_B: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x_B.device, dtype=torch.float32) / half)
    args = scale * x_B.float()[..., None] * freqs
    return torch.cat([args.sin(), args.cos()], dim=-1)


def temporal_prior(z_BTNZ: torch.Tensor, tau_BT: torch.Tensor, delta_var: float | torch.Tensor, prev_z_B1NZ=None,
                   prev_tau_B1=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior mean and residual variance of each frame's clean latents from the frame before it.

    mu_t = tau' / (tau'^2 + (1 - tau')^2) * z_{t-1} is the linear least-squares estimate of frame t-1 from its
    own noisy input (signal level tau'); the residual z1_t - mu_t has variance delta_var (how much a frame
    changes, from the data) plus that estimate's error, capped at 1 (the unit data variance). Frame 0 (or a
    previous frame of pure noise) gets mu = 0 and variance 1. `prev_*` of one frame give the frame before z's
    first (rollouts with a KV cache pass one or two frames at a time); of T frames, each frame's predecessor
    (clean-context training, where the predecessors are the context copies).
    Returns mu [B, T, N, Z] and residual variance [B, T, 1, 1]; mu_t depends on frame t-1 only (causal).
    """
    T = z_BTNZ.shape[1]
    if prev_z_B1NZ is not None and prev_z_B1NZ.shape[1] == T:
        prev_z, prev_tau = prev_z_B1NZ, prev_tau_B1
    else:
        if prev_z_B1NZ is None:
            first_z, first_tau = torch.zeros_like(z_BTNZ[:, :1]), torch.zeros_like(tau_BT[:, :1])
        else:
            first_z, first_tau = prev_z_B1NZ, prev_tau_B1
        prev_z = torch.cat([first_z, z_BTNZ[:, :-1]], dim=1)
        prev_tau = torch.cat([first_tau, tau_BT[:, :-1]], dim=1)
    t = prev_tau[:, :, None, None]
    v = t.pow(2) + (1 - t).pow(2)
    mu = (t / v) * prev_z
    r_var = torch.clamp(delta_var + (1 - t).pow(2) / v, max=1.0)
    return mu, r_var


def preconditioning(tau_BT: torch.Tensor, r_var: torch.Tensor | float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, c_skip, c_out) [B, T, 1, 1] for z_tau = tau z1 + (1 - tau) z0, z1 = mu + r, Var(r) = r_var.

    c_skip (z_tau - tau mu) is the linear least-squares estimate of r, c_out the standard deviation it
    leaves, c_in gives the network unit-variance input: EDM's preconditioning written for this interpolation
    and a prior mean. The model still predicts z1 = mu + c_skip (z_tau - tau mu) + c_out F.
    """
    tau = tau_BT[:, :, None, None]
    var = tau.pow(2) * r_var + (1 - tau).pow(2)
    return var.rsqrt(), tau * r_var / var, (1 - tau) * torch.as_tensor(r_var).sqrt() * var.rsqrt()


def token_geometry(cfg: ModelConfig, shape: TokenShape) -> tuple[int, int]:
    """(width of one model input token, model tokens per frame) after the optional 2x2 merge."""
    if cfg.merge_2x2 and (shape.grid[0] % 2 or shape.grid[1] % 2):
        raise ValueError(f"merge_2x2 needs an even token grid, the store has {shape.grid}")
    f = 4 if cfg.merge_2x2 else 1
    return shape.enc_dim * f, shape.tokens // f


def space_keep(layout: FrameLayout, registers: int, q_per_camera: int, trailing: int) -> torch.Tensor | None:
    """[B, S] "may be attended to" per token of a frame `[registers | camera blocks | trailing]` from the
    cameras present per sample (None when every camera is)."""
    if layout.present_BC is None:
        return None
    p = layout.present_BC.bool()
    B = p.shape[0]
    ones = lambda n: torch.ones(B, n, dtype=torch.bool, device=p.device)  # noqa: E731
    return torch.cat([ones(registers), p.repeat_interleave(q_per_camera, dim=1), ones(trailing)], dim=1)


def space_angles_for(angles: torch.Tensor, layout: FrameLayout, shape: TokenShape, registers: int, q_tokens: int
                     ) -> torch.Tensor:
    """The space RoPE angles of a frame holding `layout.count` cameras (every camera block has the same grid
    positions, so a frame with fewer cameras keeps the first blocks' angles and the special tokens')."""
    C = layout.count(shape)
    if C == shape.cameras:
        return angles
    per = q_tokens // shape.cameras
    return torch.cat([angles[: registers + C * per], angles[registers + q_tokens:]])


def embodiment_embedding(io: nn.Module, layout: FrameLayout) -> torch.Tensor | float:
    """[D], or [B, 1, D] per sample: `io.embodiment`'s learned embedding of the robot the state is of (0 for a
    model of one robot, which has none)."""
    table = getattr(io, "embodiment", None)
    if table is None:
        return 0.0
    e = layout.embodiment if layout.embodiment is not None else 0
    return table[e][:, None] if torch.is_tensor(e) else table[e]


class LatentIO(nn.Module):
    """Model latents [B, T, N(+1), Z] <-> model tokens [B, T, Q(+1), D], shared by both world models:
    the optional 2x2 merge and camera-slot embedding for patches, a linear map for the state token. The latents
    hold the camera slots `FrameLayout.slots` (all by default)."""

    def __init__(self, cfg: ModelConfig, shape: TokenShape, extra_inputs: int = 0):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        merged_dim, self.q_tokens = token_geometry(cfg, shape)
        D, S = cfg.dim, shape.state_dim
        self.proj_in = nn.Linear(merged_dim, D)
        self.camera = nn.Parameter(torch.zeros(shape.cameras, 1, D))
        # further latent-shaped inputs (the shortcut model's residual and prior), bias-free
        self.extra = nn.ModuleList(nn.Linear(merged_dim, D, bias=False) for _ in range(extra_inputs))
        self.proj_out = nn.Linear(D, merged_dim)
        if S:
            self.state_in = nn.Linear(S, D)
            self.state_extra = nn.ModuleList(nn.Linear(S, D, bias=False) for _ in range(extra_inputs))
            self.state_out = nn.Linear(D, S)
            if len(shape.embodiments) > 1:  # which robot the state is of (zero at start, as the camera slots)
                self.embodiment = nn.Parameter(torch.zeros(len(shape.embodiments), D))

    @property
    def tokens(self) -> int:
        """Model tokens per frame for the latents (Q patches, plus the state token)."""
        return self.q_tokens + (1 if self.shape.state_dim else 0)

    def _patches(self, z_BTNZ: torch.Tensor) -> torch.Tensor:
        return merge_2x2(z_BTNZ, self.shape) if self.cfg.merge_2x2 else z_BTNZ

    def camera_embedding(self, layout: FrameLayout) -> torch.Tensor:
        """[Q', D]: each camera block's slot embedding, repeated over its tokens (picked slot by slot: indexing
        with a list would copy host data to the device, which a captured CUDA graph cannot)."""
        emb = self.camera if layout.slots is None else torch.stack([self.camera[i] for i in layout.slots])
        per_cam = self.q_tokens // self.shape.cameras
        return emb.expand(-1, per_cam, -1).reshape(-1, self.cfg.dim)

    def embed(self, z_BTNZ: torch.Tensor, *extras: torch.Tensor | None, layout: FrameLayout = FULL_FRAME
              ) -> torch.Tensor:
        patches, state = split_state(z_BTNZ, self.shape)
        x = self.proj_in(self._patches(patches)) + self.camera_embedding(layout)
        for e, proj in zip(extras, self.extra):
            if e is not None:
                x = x + proj(self._patches(split_state(e, self.shape)[0]))
        if state is None:
            return x
        s = self.state_in(state) + embodiment_embedding(self, layout)
        for e, proj in zip(extras, self.state_extra):
            if e is not None:
                s = s + proj(split_state(e, self.shape)[1])
        return torch.cat([x, s[:, :, None]], dim=2)

    def readout(self, h_BTQD: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states of the latent tokens [B, T, Q(+1), D] -> latents [B, T, N(+1), Z]."""
        q = h_BTQD.shape[2] - (1 if self.shape.state_dim else 0)  # this frame's patch tokens (its cameras)
        out = self.proj_out(h_BTQD[:, :, :q])
        if self.cfg.merge_2x2:
            out = unmerge_2x2(out, self.shape)
        if not self.shape.state_dim:
            return out
        return pack_state(out, self.state_out(h_BTQD[:, :, q]), self.shape)

    def mask(self, z_BTNZ: torch.Tensor, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        """Zero the state token's channels that hold no state of the sample's robot (`trainer.tokens.mask_state`;
        no-op without proprioception)."""
        return mask_state(z_BTNZ, self.shape, layout)


class ShortcutDynamics(nn.Module):
    """f(z_tau, tau, d, actions) -> predicted clean latents, frame-causally."""

    def __init__(self, cfg: ModelConfig, shape: TokenShape):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        D = cfg.dim
        self.io = LatentIO(cfg, shape, extra_inputs=2)  # extras: the frame's change from its temporal prior,
        # and the temporal prior itself
        self.registers = nn.Parameter(torch.randn(cfg.registers, D) * 0.02)
        self.tau_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.step_embed = nn.Embedding(int(math.log2(cfg.k_max)) + 1, D)  # index j: d = 2**-j
        self.null_action = nn.Parameter(torch.randn(D) * 0.02)
        self.action_mlp = nn.Sequential(nn.Linear(max(1, shape.action_dim), D), nn.SiLU(), nn.Linear(D, D))
        n = cfg.depth
        self.blocks = nn.ModuleList(Block(cfg, time=(i + 1) % cfg.time_every == 0 or i == n - 1) for i in range(n))
        self.norm_out = RMSNorm(D)
        trailing = self.io.tokens - self.io.q_tokens + 2  # (state), shortcut, action
        rows, cols = space_positions(shape, cfg.merge_2x2, cfg.registers, trailing=trailing)
        self.register_buffer("space_angles", rope_2d_angles(rows, cols, D // cfg.heads, cfg.rope_theta_space),
                             persistent=False)
        # variance of a frame-to-frame change in normalised tokens (the state token included: it is scaled to
        # change like a patch); set from the data by the trainer, saved
        self.register_buffer("delta_var", torch.tensor(0.5))

    # -- token construction -------------------------------------------------------------------------------
    def shortcut_token(self, tau_BT: torch.Tensor, d_BT: torch.Tensor) -> torch.Tensor:
        j = torch.round(-torch.log2(d_BT)).long().clamp(0, self.step_embed.num_embeddings - 1)
        emb = sinusoidal(tau_BT, self.cfg.dim).to(self.tau_mlp[0].weight.dtype)  # a bf16 model takes bf16
        return self.tau_mlp(emb) + self.step_embed(j)  # [B, T, D]

    def action_token(self, actions_BTA: torch.Tensor | None, valid_BT: torch.Tensor | None,
                     B: int, T: int) -> torch.Tensor:
        """Learned null embedding, plus an MLP of the action where one is given and valid."""
        tok = self.null_action.expand(B, T, -1)
        if actions_BTA is None or valid_BT is None or self.shape.action_dim == 0:
            return tok
        a = torch.nan_to_num(actions_BTA, nan=0.0)
        return tok + self.action_mlp(a) * valid_BT[..., None].to(a.dtype)

    def tokens(self, z_BTND, tau_BT, d_BT, actions_BTA=None, valid_BT=None, residual_BTND=None,
               prior_BTND=None, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        B, T = z_BTND.shape[:2]
        latents = self.io.embed(z_BTND, residual_BTND, prior_BTND, layout=layout)
        action = self.action_token(actions_BTA, valid_BT, B, T)[:, :, None]
        if self.cfg.conditioning == "add":  # every latent token carries its frame's action from the first layer
            latents = latents + action
        parts = [self.registers.expand(B, T, -1, -1), latents, self.shortcut_token(tau_BT, d_BT)[:, :, None], action]
        return torch.cat(parts, dim=2)  # [B, T, S, D]

    def readout(self, x_BTSD: torch.Tensor) -> torch.Tensor:
        r = self.cfg.registers
        return self.io.readout(self.norm_out(x_BTSD[:, :, r:-2]))  # the latent tokens (before shortcut, action)

    def space_inputs(self, layout: FrameLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(space RoPE angles, per-sample key mask or None) of frames holding `layout`."""
        angles = space_angles_for(self.space_angles, layout, self.shape, self.cfg.registers, self.io.q_tokens)
        per = self.io.q_tokens // self.shape.cameras
        return angles, space_keep(layout, self.cfg.registers, per, self.io.tokens - self.io.q_tokens + 2)

    def time_angles(self, T: int, offset: int = 0, device=None) -> torch.Tensor:
        pos = torch.arange(offset, offset + T, device=device)
        return rope_angles(pos, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta_time)

    def forward(self, z_BTND: torch.Tensor, tau_BT: torch.Tensor, d_BT: torch.Tensor,
                actions_BTA: torch.Tensor | None = None, valid_BT: torch.Tensor | None = None,
                context_BTND: torch.Tensor | None = None, context_tau: float = 0.9, *,
                layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        """Noisy latents z [B, T, N, Z] at signal levels tau [B, T] with step sizes d [B, T] -> clean [B, T, N, Z].

        Diffusion forcing (no `context`): frame t attends to the noisy frames <= t. Clean context: the same
        frames, seen as context at signal level `context_tau`, are processed alongside, and noisy frame t
        attends in time to the context frames < t and to itself, which is exactly the generation regime.
        `layout`: the camera slots the latents hold and which are present per sample (`trainer.tokens.FrameLayout`).
        """
        if context_BTND is None:
            return self.denoise(z_BTND, tau_BT, d_BT, actions_BTA, valid_BT, layout=layout)
        B, T = z_BTND.shape[:2]
        ctx_tau = torch.full_like(tau_BT, context_tau)
        d_min = torch.full_like(d_BT, 1.0 / self.cfg.k_max)
        xc, _ = self._embed(context_BTND, ctx_tau, d_min, actions_BTA, valid_BT, None, layout)
        prev = (torch.cat([torch.zeros_like(context_BTND[:, :1]), context_BTND[:, :-1]], dim=1),
                torch.cat([torch.zeros_like(ctx_tau[:, :1]), ctx_tau[:, :-1]], dim=1))
        xn, finish = self._embed(z_BTND, tau_BT, d_BT, actions_BTA, valid_BT, prev, layout)
        x = torch.cat([xc, xn], dim=1)  # [B, 2T, S, D]: context copies, then noisy copies
        t = torch.arange(T, device=x.device)
        q, k = torch.cat([t, t]), torch.cat([t, t])
        q_ctx, k_ctx = torch.arange(2 * T, device=x.device) < T, torch.arange(2 * T, device=x.device) < T
        mask = (q_ctx[:, None] & k_ctx[None, :] & (k[None, :] <= q[:, None])) | \
            (~q_ctx[:, None] & k_ctx[None, :] & (k[None, :] < q[:, None])) | torch.eye(2 * T, dtype=torch.bool,
                                                                                 device=x.device)
        angles = rope_angles(q, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta_time)
        s_angles, keep = self.space_inputs(layout)
        for block in self.blocks:
            x = block(x, s_angles, angles, time_mask=mask if block.time else None, space_keep_BS=keep)
        return finish(self.readout(x[:, T:]))

    def _embed(self, z_BTND, tau_BT, d_BT, actions_BTA, valid_BT, prev, layout: FrameLayout = FULL_FRAME):
        """Tokens of (noisy) frames and the function that turns the network's readout into z1_hat."""
        residual = prior = None
        if not self.cfg.precondition:
            mu, c_in, c_skip, c_out = 0.0, 1.0, 0.0, 1.0
        else:
            c_in = preconditioning(tau_BT)[0]  # the network sees each noisy frame itself, at unit variance
            if self.cfg.temporal_prior:
                mu, r_var = temporal_prior(z_BTND, tau_BT, self.delta_var, *(prev or (None, None)))
                c_res, c_skip, c_out = preconditioning(tau_BT, r_var)
                residual = (z_BTND - tau_BT[:, :, None, None] * mu) * c_res  # ... its change from the prior
                prior = mu  # ... and the previous frame's estimate, in place (as a next-frame predictor has it)
            else:
                mu, r_var = torch.zeros_like(z_BTND), torch.ones_like(tau_BT[:, :, None, None])
                _, c_skip, c_out = preconditioning(tau_BT)
            if not self.cfg.precondition_skip:  # the change from the prior at its own scale, all from the network
                c_skip, c_out = torch.zeros_like(c_skip), torch.as_tensor(r_var).sqrt().expand_as(c_out)
        x = self.tokens(z_BTND * c_in, tau_BT, d_BT, actions_BTA, valid_BT, residual, prior, layout)

        def finish(readout_BTNZ: torch.Tensor) -> torch.Tensor:
            # around the prior: mu + least-squares estimate of the residual from this frame + what is left
            return self.io.mask(mu + c_skip * (z_BTND - tau_BT[:, :, None, None] * mu) + c_out * readout_BTNZ,
                                layout)

        return x, finish

    def denoise(self, z_BTND, tau_BT, d_BT, actions_BTA=None, valid_BT=None, *, prev=None, pos: int = 0,
                time_kv=None, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        """Frames attending causally to each other, from time position `pos`; `prev` = (z, tau) of the frame
        before (rollouts with a KV cache process one frame at a time), `time_kv(layer)` gives cached keys."""
        x, finish = self._embed(z_BTND, tau_BT, d_BT, actions_BTA, valid_BT, prev, layout)
        t_angles = self.time_angles(x.shape[1], offset=pos, device=x.device)
        s_angles, keep = self.space_inputs(layout)
        for i, block in enumerate(self.blocks):
            x = block(x, s_angles, t_angles, time_kv=time_kv(i) if time_kv and block.time else None,
                      space_keep_BS=keep)
        return finish(self.readout(x))
