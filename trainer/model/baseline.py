"""DINO-WM-style teacher-forced predictor (architecture only): the baseline the shortcut model must beat.

Each frame's tokens and the action taken after it predict the next frame. Attention is full over the tokens
of all frames <= t (a block-causal mask over the flattened sequence, as in DINO-WM), with 2-D RoPE inside a
frame and learned frame embeddings. Deterministic, trained with MSE. The action (and the proprio state) enters
as one more token per frame (`conditioning="token"`), or as in DINO-WM (`"concat"`): each embedded to
`concat_dim` channels and concatenated to every patch token; the state is then read out of the mean of the
frame's patch outputs.

Legend: B = batch, T = frames, N = latent tokens per frame (patches, + the state token with proprioception),
Q = model tokens per frame for them, S = Q + 1, D = width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from trainer.config import ModelConfig
from trainer.model.common import Attention, RMSNorm, SwiGLU, rope_2d_angles
from trainer.model.dynamics import (
    LatentIO,
    embodiment_embedding,
    merge_2x2,
    space_angles_for,
    space_keep,
    space_positions,
    token_geometry,
    unmerge_2x2,
)
from trainer.tokens import FULL_FRAME, FrameLayout, TokenShape, mask_state, pack_state, split_state


class FullBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn, self.norm_mlp = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.kv_heads, qk_norm=cfg.qk_norm, softcap=cfg.softcap)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_ratio)

    def forward(self, x_BLD: torch.Tensor, angles: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm_attn(x_BLD), angles=angles, mask_LM=mask_LL)
        return x_BLD + self.mlp(self.norm_mlp(x_BLD))


class ConcatIO(nn.Module):
    """DINO-WM's conditioning: patch tokens projected to D - 2c channels, the action and the proprio state
    embedded to c channels each (a k=1 Conv1d in DINO-WM, a linear map here) and concatenated to every patch
    token. An invalid action (action-free clip) is a learned null embedding."""

    def __init__(self, cfg: ModelConfig, shape: TokenShape):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        merged_dim, self.q_tokens = token_geometry(cfg, shape)
        c, D, S = cfg.concat_dim, cfg.dim, shape.state_dim
        self.proj_in = nn.Linear(merged_dim, D - 2 * c)
        self.camera = nn.Parameter(torch.zeros(shape.cameras, 1, D))
        self.null_action = nn.Parameter(torch.randn(c) * 0.02)
        self.action_in = nn.Linear(max(1, shape.action_dim), c)
        self.state_in = nn.Linear(S, c) if S else None
        if S and len(shape.embodiments) > 1:  # which robot the state is of
            self.embodiment = nn.Parameter(torch.zeros(len(shape.embodiments), c))
        self.proj_out = nn.Linear(D, merged_dim)
        self.state_out = nn.Linear(D, S) if S else None

    tokens = property(lambda self: self.q_tokens)

    def embed(self, z_BTNZ, next_actions_BTA, next_valid_BT, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        patches, state = split_state(z_BTNZ, self.shape)
        if self.cfg.merge_2x2:
            patches = merge_2x2(patches, self.shape)
        B, T, Q = patches.shape[:3]
        act = self.null_action.expand(B, T, -1)
        if next_actions_BTA is not None and next_valid_BT is not None and self.shape.action_dim:
            act = act + self.action_in(torch.nan_to_num(next_actions_BTA)) * next_valid_BT[..., None].to(act.dtype)
        st = self.state_in(state) + embodiment_embedding(self, layout) if self.state_in is not None else \
            torch.zeros_like(act)
        x = torch.cat([self.proj_in(patches), act[:, :, None].expand(-1, -1, Q, -1),
                       st[:, :, None].expand(-1, -1, Q, -1)], dim=-1)
        emb = self.camera if layout.slots is None else torch.stack([self.camera[i] for i in layout.slots])
        return x + emb.expand(-1, self.q_tokens // self.shape.cameras, -1).reshape(-1, self.cfg.dim)

    def readout(self, h_BTQD: torch.Tensor, keep_BQ: torch.Tensor | None = None) -> torch.Tensor:
        """The state from the mean of the present cameras' patch outputs (`keep_BQ`; all when None)."""
        out = self.proj_out(h_BTQD)
        if self.cfg.merge_2x2:
            out = unmerge_2x2(out, self.shape)
        if self.state_out is None:
            return out
        if keep_BQ is None:
            pooled = h_BTQD.mean(2)
        else:
            w = keep_BQ.to(h_BTQD.dtype)[:, None, :, None]
            pooled = (h_BTQD * w).sum(2) / w.sum(2)
        return pack_state(out, self.state_out(pooled), self.shape)


class TeacherForcedPredictor(nn.Module):
    """pred[t] = g(frames <= t, actions <= t) approximates the latents of frame t + 1."""

    def __init__(self, cfg: ModelConfig, shape: TokenShape):
        super().__init__()
        self.cfg, self.shape = cfg, shape
        D = cfg.dim
        self.concat = cfg.conditioning == "concat"
        self.io = ConcatIO(cfg, shape) if self.concat else LatentIO(cfg, shape)
        self.frame = nn.Embedding(cfg.max_frames, D)
        trailing = 0
        if not self.concat:  # created after io and frame: the order fixes the initialisation for a seed
            self.null_action = nn.Parameter(torch.randn(D) * 0.02)
            self.action_mlp = nn.Sequential(nn.Linear(max(1, shape.action_dim), D), nn.SiLU(), nn.Linear(D, D))
            trailing = self.io.tokens - self.io.q_tokens + 1  # (state), action
        self.blocks = nn.ModuleList(FullBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = RMSNorm(D)
        rows, cols = space_positions(shape, cfg.merge_2x2, registers=0, trailing=trailing)
        angles = rope_2d_angles(rows, cols, D // cfg.heads, cfg.rope_theta_space)
        self.register_buffer("space_angles", angles, persistent=False)  # [S, E/2]

    def forward(self, z_BTND: torch.Tensor, next_actions_BTA: torch.Tensor | None = None,
                next_valid_BT: torch.Tensor | None = None, *, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
        """Clean latents z [B, T, N, Z] and the action taken after each frame -> next-frame latents [B, T, N, Z].
        `layout`: the camera slots the latents hold and which are present per sample (`trainer.tokens.FrameLayout`)."""
        B, T = z_BTND.shape[:2]
        if T > self.cfg.max_frames:
            raise ValueError(f"{T} frames exceed max_frames={self.cfg.max_frames}")
        if self.concat:
            x = self.io.embed(z_BTND, next_actions_BTA, next_valid_BT, layout)  # [B, T, Q, D]
        else:
            x = self.io.embed(z_BTND, layout=layout)
            act = self.null_action.expand(B, T, -1)
            if next_actions_BTA is not None and next_valid_BT is not None and self.shape.action_dim:
                act = act + self.action_mlp(torch.nan_to_num(next_actions_BTA)) * next_valid_BT[..., None].to(x.dtype)
            x = torch.cat([x, act[:, :, None]], dim=2)  # [B, T, S, D]
        x = x + self.frame(torch.arange(T, device=x.device))[None, :, None]
        S = x.shape[2]
        frame_of = torch.arange(T, device=x.device).repeat_interleave(S)
        mask = frame_of[:, None] >= frame_of[None, :]  # [T*S, T*S]: frames <= t
        per = self.io.q_tokens // self.shape.cameras
        keep = space_keep(layout, 0, per, S - layout.count(self.shape) * per)  # [B, S] or None
        if keep is not None:  # an absent camera's tokens are never attended to
            mask = mask[None, None] & keep.repeat(1, T)[:, None, None, :]
        angles = space_angles_for(self.space_angles, layout, self.shape, 0, self.io.q_tokens).repeat(T, 1)
        h = rearrange(x, "b t s d -> b (t s) d")
        for block in self.blocks:
            h = block(h, angles, mask)
        q = layout.count(self.shape) * per + (0 if self.concat else self.io.tokens - self.io.q_tokens)
        h = rearrange(h, "b (t s) d -> b t s d", t=T)[:, :, :q]
        if self.concat:
            out = self.io.readout(self.norm_out(h), None if keep is None else keep[:, :q])
        else:
            out = self.io.readout(self.norm_out(h))
        return mask_state(out, self.shape, layout)  # no values where the sample's robot has no state channel
