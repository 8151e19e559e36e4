"""The token layout of a frame, shared by data, models, objective and inference.

A frame's latents are the store's patch tokens of every camera, concatenated along the token axis
(`cameras x grid_h x grid_w` tokens of width `enc_dim`); with proprioception (`state_dim > 0`, as DINO-WM) the
normalised robot state is one more token: its first `state_dim` channels, the rest zero.
Legend: N = latent tokens per frame, Z = token width, S = state width.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TokenShape:
    """What the store gives per frame: cameras x (grid_h x grid_w) tokens of width enc_dim; actions."""

    cameras: int
    grid: tuple[int, int]
    enc_dim: int
    action_dim: int
    state_dim: int = 0  # > 0: the normalised state is one more latent token (proprioception)

    def __post_init__(self) -> None:
        if self.state_dim > self.enc_dim:
            raise ValueError(f"state width {self.state_dim} exceeds the token width {self.enc_dim}")

    @property
    def tokens(self) -> int:
        """Encoder (patch) tokens per frame."""
        return self.cameras * self.grid[0] * self.grid[1]

    @property
    def latent_tokens(self) -> int:
        """Tokens per frame of the model's latents: the patches, plus the state token with proprioception."""
        return self.tokens + (1 if self.state_dim else 0)


def pack_state(patches_NZ: torch.Tensor, state_S: torch.Tensor | None, shape: TokenShape) -> torch.Tensor:
    """Patch latents [..., N, Z] and normalised states [..., S] -> model latents [..., N(+1), Z]."""
    if not shape.state_dim:
        return patches_NZ
    if state_S is None:
        raise ValueError("this model predicts the state (proprioception): pass the states with the tokens")
    pad = patches_NZ.new_zeros((*state_S.shape[:-1], shape.enc_dim))
    pad[..., : shape.state_dim] = state_S.to(pad)
    return torch.cat([patches_NZ, pad[..., None, :]], dim=-2)


def split_state(z_NZ: torch.Tensor, shape: TokenShape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model latents [..., N(+1), Z] -> (patch latents [..., N, Z], normalised states [..., S] or None)."""
    if not shape.state_dim:
        return z_NZ, None
    return z_NZ[..., :-1, :], z_NZ[..., -1, : shape.state_dim]


def frame_error(diff_BTNZ: torch.Tensor, shape: TokenShape, state_weight: float = 1.0) -> torch.Tensor:
    """Squared error per frame [B, T]: mean over the patch tokens, plus `state_weight` x the mean over the
    state's channels (DINO-WM weights the two alike); the zero padding of the state token counts nowhere."""
    patches, state = split_state(diff_BTNZ, shape)
    err = patches.pow(2).mean(dim=(-2, -1))
    return err if state is None else err + state_weight * state.pow(2).mean(-1)
