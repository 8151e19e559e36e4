"""The token layout of a frame, shared by data, models, objective and inference.

A frame's latents are the store's patch tokens of every camera, concatenated along the token axis
(`cameras x grid_h x grid_w` tokens of width `enc_dim`); with proprioception (`state_dim > 0`, as DINO-WM) the
normalised robot state is one more token: its first `state_dim` channels, the rest zero.

Cameras go by role: the model has camera slots (`TokenShape.slots`, e.g. exterior_1, exterior_2, wrist), and each
training source fills some of them (`source_slots`: the slot of each of its store cameras). In a training batch
every sample holds all slots, a slot its source lacks is zero and marked absent (`FrameLayout.present_BC`): masked
out of attention and of the loss, never seen as a frame. Inference on one source passes only that source's cameras
(`FrameLayout.slots`): the same model, no compute spent on a camera that is not there.

Robots by embodiment: with proprioception and sources of different robots (`TokenShape.embodiments`, each with
its state width; DROID's 8-D Franka and a 7-D arm), the state token holds the sample's own state, normalised with
its embodiment's statistics, in its first channels (the widest robot's width in all, the rest zero and out of the
loss), and a learned embedding of the embodiment (`FrameLayout.embodiment`) is added to the state token's input.
Legend: B = batch, C = camera slots, N = latent tokens per frame, Z = token width, S = state width.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TokenShape:
    """A model's frame: camera slots x (grid_h x grid_w) tokens of width enc_dim (+ the state token), its action
    width, and how each training source's cameras and robot fill it."""

    cameras: int
    grid: tuple[int, int]
    enc_dim: int
    action_dim: int
    state_dim: int = 0  # > 0: the normalised state is one more latent token (proprioception)
    slots: tuple[str, ...] = ()  # the camera slots' names (empty: by position, "camera0", ...)
    # per training source, the slot of each of its store cameras in store order (empty: every source fills all)
    source_slots: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # with proprioception across robots: (name, state width) per embodiment, and each training source's index
    # (empty: one embodiment of width state_dim)
    embodiments: tuple[tuple[str, int], ...] = ()
    source_embodiment: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.state_dim > self.enc_dim:
            raise ValueError(f"state width {self.state_dim} exceeds the token width {self.enc_dim}")
        if self.slots and len(self.slots) != self.cameras:
            raise ValueError(f"{len(self.slots)} slot names for {self.cameras} cameras")
        if self.embodiments and max(w for _, w in self.embodiments) != self.state_dim:
            raise ValueError(f"state width {self.state_dim} is not the widest embodiment's {self.embodiments}")

    @classmethod
    def from_dict(cls, d: dict) -> TokenShape:
        """The inverse of `dataclasses.asdict` (a run's saved shape; runs before camera slots have none)."""
        d = dict(d)
        d["grid"] = tuple(d["grid"])
        d["slots"] = tuple(d.get("slots", ()))
        d["source_slots"] = tuple((str(s), tuple(int(i) for i in idx)) for s, idx in d.get("source_slots", ()))
        d["embodiments"] = tuple((str(n), int(w)) for n, w in d.get("embodiments", ()))
        d["source_embodiment"] = tuple((str(s), int(i)) for s, i in d.get("source_embodiment", ()))
        return cls(**d)

    def embodiment_of(self, source: str) -> int:
        """A training source's embodiment index (0 for a model of one embodiment)."""
        return dict(self.source_embodiment).get(source, 0)

    def state_width(self, embodiment: int = 0) -> int:
        """The state width of an embodiment (its first channels of the state token)."""
        return self.embodiments[embodiment][1] if self.embodiments else self.state_dim

    def state_valid(self, layout: FrameLayout, device: torch.device | str | None = None) -> torch.Tensor | None:
        """[B or 1, S] which of the state token's S channels hold the state of each sample's robot (None: all), on
        `device` (a per-sample embodiment tensor's own device). One robot's mask is made without host data (no
        tensor from Python values), so it can sit inside a captured CUDA graph."""
        if len(self.embodiments) < 2:
            return None
        e = layout.embodiment if layout.embodiment is not None else 0
        if not torch.is_tensor(e):
            return torch.arange(self.state_dim, device=device)[None] < self.state_width(int(e))
        widths = torch.tensor([w for _, w in self.embodiments], device=e.device)
        return torch.arange(self.state_dim, device=e.device)[None] < widths[e.long()].reshape(-1, 1)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return self.slots or tuple(f"camera{i}" for i in range(self.cameras))

    def slots_of(self, source: str) -> tuple[int, ...]:
        """The slots a source's store cameras fill, in store order (all, for a model without source slots or a
        source it was not trained on whose cameras go by position)."""
        return dict(self.source_slots).get(source, tuple(range(self.cameras)))

    @property
    def tokens(self) -> int:
        """Encoder (patch) tokens per frame."""
        return self.cameras * self.grid[0] * self.grid[1]

    @property
    def latent_tokens(self) -> int:
        """Tokens per frame of the model's latents: the patches, plus the state token with proprioception."""
        return self.tokens + (1 if self.state_dim else 0)


@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """What a batch of latents holds: `slots`, the model's camera slots its camera blocks are, in order (None:
    all, in slot order); `present_BC`, per sample which of those blocks are real (None: all; an absent block's
    tokens are masked out of attention and of the loss); `embodiment`, the robot of every sample (an int) or of
    each ([B] long), with proprioception across robots (None: embodiment 0)."""

    slots: tuple[int, ...] | None = None
    present_BC: torch.Tensor | None = None
    embodiment: int | torch.Tensor | None = None

    def count(self, shape: TokenShape) -> int:
        return shape.cameras if self.slots is None else len(self.slots)

    def rows(self, rows: torch.Tensor) -> FrameLayout:
        """The same layout for a subset of the batch's samples."""
        e = self.embodiment
        return FrameLayout(self.slots, None if self.present_BC is None else self.present_BC[rows],
                           e[rows] if torch.is_tensor(e) else e)


FULL_FRAME = FrameLayout()


def pack_state(patches_NZ: torch.Tensor, state_S: torch.Tensor | None, shape: TokenShape) -> torch.Tensor:
    """Patch latents [..., N, Z] and normalised states [..., S] -> model latents [..., N(+1), Z]."""
    if not shape.state_dim:
        return patches_NZ
    if state_S is None:
        raise ValueError("this model predicts the state (proprioception): pass the states with the tokens")
    pad = patches_NZ.new_zeros((*state_S.shape[:-1], shape.enc_dim))
    pad[..., : shape.state_dim] = state_S.to(pad)
    return torch.cat([patches_NZ, pad[..., None, :]], dim=-2)


def mask_state(z_NZ: torch.Tensor, shape: TokenShape, layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """Model latents [B, T, N(+1), Z] with the state token's channels that hold no state of each sample's robot
    set to 0 (its padding to Z, and past a narrower robot's width): what training inputs hold there, so a
    rollout feeds back no values the model never saw."""
    if not shape.state_dim:
        return z_NZ
    valid = shape.state_valid(layout, z_NZ.device)  # [B or 1, S] or None
    keep = torch.zeros(shape.enc_dim, dtype=z_NZ.dtype, device=z_NZ.device)
    keep[: shape.state_dim] = 1
    if valid is not None:
        keep = torch.cat([valid.to(keep), keep[shape.state_dim:].expand(len(valid), -1)], dim=-1)  # [B or 1, Z]
        keep = keep.reshape(len(valid), *[1] * (z_NZ.dim() - 2), shape.enc_dim)
    return torch.cat([z_NZ[..., :-1, :], z_NZ[..., -1:, :] * keep], dim=-2)


def split_state(z_NZ: torch.Tensor, shape: TokenShape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Model latents [..., N(+1), Z] -> (patch latents [..., N, Z], normalised states [..., S] or None)."""
    if not shape.state_dim:
        return z_NZ, None
    return z_NZ[..., :-1, :], z_NZ[..., -1, : shape.state_dim]


def frame_error(diff_BTNZ: torch.Tensor, shape: TokenShape, state_weight: float = 1.0,
                layout: FrameLayout = FULL_FRAME) -> torch.Tensor:
    """Squared error per frame [B, T]: mean over the patch tokens (of the cameras each sample has, `layout`),
    plus `state_weight` x the mean over the state's channels of each sample's robot (DINO-WM weights the two
    alike); the zero padding of the state token counts nowhere."""
    patches, state = split_state(diff_BTNZ, shape)
    present_BC = layout.present_BC
    if present_BC is None:
        err = patches.pow(2).mean(dim=(-2, -1))
    else:
        B, T, N, Z = patches.shape
        C = present_BC.shape[1]
        per_cam = patches.reshape(B, T, C, N // C, Z).pow(2).mean(dim=(-2, -1))  # [B, T, C]
        w = present_BC.to(per_cam.dtype)[:, None]
        err = (per_cam * w).sum(-1) / w.sum(-1).clamp(min=1)
    if state is None:
        return err
    valid = shape.state_valid(layout, state.device)
    if valid is None:
        return err + state_weight * state.pow(2).mean(-1)
    v = valid.to(state.dtype)[:, None]  # [B or 1, 1, S]
    return err + state_weight * (state.pow(2) * v).sum(-1) / v.sum(-1)
