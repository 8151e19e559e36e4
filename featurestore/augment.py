"""Consistent temporal augmentation: one parameter set per clip (episode x view), applied to every frame.

A world model must not see the colours or the framing jump between frames of one clip, so each extra
view draws its colour jitter (brightness, contrast, saturation, hue) and its random crop once, from a
seed derived from (augment seed, source, episode, view), and applies them to all frames of the episode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch


@dataclasses.dataclass(frozen=True)
class ClipAugment:
    """Parameters of one augmented view. Crop box in relative coordinates (top, left, height, width)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float  # radians of rotation in YIQ chroma space
    crop: tuple[float, float, float, float]

    @classmethod
    def sample(cls, *, seed: int, source: str, episode: int, view: int, strength: float = 0.5) -> ClipAugment:
        digest = hashlib.sha256(f"{seed}:{source}:{episode}:{view}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))
        u = torch.rand(8, generator=g).tolist()
        s = strength
        scale = 1.0 - 0.3 * s * u[4]  # keep 70-100% of each side at full strength
        return cls(
            brightness=1.0 + 0.4 * s * (2 * u[0] - 1),
            contrast=1.0 + 0.4 * s * (2 * u[1] - 1),
            saturation=1.0 + 0.4 * s * (2 * u[2] - 1),
            hue=0.1 * math.pi * s * (2 * u[3] - 1),
            crop=(u[5] * (1 - scale), u[6] * (1 - scale), scale, scale),
        )

    def __call__(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] in [0, 1] -> the augmented frames (cropped, same dtype, values in [0, 1])."""
        h, w = x_BCHW.shape[-2:]
        top, left, ch, cw = self.crop
        t, l_ = round(top * h), round(left * w)
        x = x_BCHW[..., t:t + max(1, round(ch * h)), l_:l_ + max(1, round(cw * w))]
        x = x * self.brightness
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # [B, 1, H, W]
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * self.contrast + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = gray + (x - gray) * self.saturation
        if self.hue:
            x = _rotate_hue(x, self.hue)
        return x.clamp_(0.0, 1.0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "crop": list(self.crop)}


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x_BCHW: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ  # [3, 3]
    return torch.einsum("ij,bjhw->bihw", m.to(x_BCHW), x_BCHW)
