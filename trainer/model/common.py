"""Transformer building blocks shared by the world models (architecture only).

Legend: B = batch, T = frames, S = tokens per frame, L = sequence length of one attention call,
H = query heads, G = key/value heads (GQA), E = head dim, D = model width.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rope_angles(pos_L: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Rotation angles [L, dim/2] for integer or float positions `pos_L`."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=pos_L.device, dtype=torch.float32) / dim)
    return pos_L.float()[:, None] * inv_freq[None, :]


def rope_2d_angles(row_L: torch.Tensor, col_L: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """2-D RoPE: the first half of each head rotates with the row, the second half with the column."""
    half = head_dim // 2
    return torch.cat([rope_angles(row_L, half, theta), rope_angles(col_L, half, theta)], dim=-1)  # [L, E/2]


def apply_rope(x_BHLE: torch.Tensor, angles_LE2: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of channels by `angles` ([L, E/2], broadcast over batch and heads).

    On the CPU (eager) as one complex multiplication: the same rotation, several times faster there than the
    strided pairs below (`wmctl bench plan`; docs/results.md, 2026-11-30, "CPU kernel timings"); elsewhere (CUDA,
    torch.compile, which does not lower complex numbers) the real form."""
    if x_BHLE.device.type == "cpu" and not torch.compiler.is_compiling():
        xc = torch.view_as_complex(x_BHLE.float().unflatten(-1, (-1, 2)))
        angles = angles_LE2.float()
        rot = torch.polar(torch.ones_like(angles), angles)
        return torch.view_as_real(xc * rot).flatten(-2).to(x_BHLE.dtype)
    cos, sin = angles_LE2.cos().to(x_BHLE.dtype), angles_LE2.sin().to(x_BHLE.dtype)
    x1, x2 = x_BHLE[..., 0::2], x_BHLE[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # [B, H, L, E/2, 2]
    return out.flatten(-2)


_EXPAND_KV_HEADS = False


@contextlib.contextmanager
def expanded_kv_heads():
    """Attention repeats the key/value heads itself instead of SDPA's grouped-query path (the same values): for
    torch's FLOP counter, whose formula for the fused CUDA kernels does not know grouped-query shapes."""
    global _EXPAND_KV_HEADS
    old, _EXPAND_KV_HEADS = _EXPAND_KV_HEADS, True
    try:
        yield
    finally:
        _EXPAND_KV_HEADS = old


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, QK-norm, RoPE and optional logit soft-capping.

    Uses `scaled_dot_product_attention`; soft-capping (cap * tanh(logits / cap)) cannot go through SDPA,
    so with `softcap` set the logits are computed explicitly (same math, more memory).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, *, qk_norm: bool = True, softcap: float | None = None):
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim {dim} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.softcap = softcap
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def project_kv(self, x_BLD: torch.Tensor, angles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, G, L, E] (keys normalised and rotated), e.g. for a KV cache."""
        B, L, _ = x_BLD.shape
        k, v = self.kv(x_BLD).view(B, L, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k).transpose(1, 2)  # [B, G, L, E]
        if angles is not None:
            k = apply_rope(k, angles)
        return k, v.transpose(1, 2)

    def forward(self, x_BLD: torch.Tensor, *, angles: torch.Tensor | None = None, causal: bool = False,
                mask_LM: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                q_angles: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]. `kv` overrides keys/values ([B, G, M, E], e.g. cache + new frame);
        `mask_LM` is a boolean "may attend" mask, [L, M] or per batch row [B, 1, L or 1, M]; `causal` masks
        j > i (with M >= L: aligned to the end)."""
        B, L, _ = x_BLD.shape
        q = self.q_norm(self.q(x_BLD).view(B, L, self.heads, self.head_dim)).transpose(1, 2)  # [B, H, L, E]
        if q_angles is None:
            q_angles = angles
        if q_angles is not None:
            q = apply_rope(q, q_angles)
        k, v = kv if kv is not None else self.project_kv(x_BLD, angles)
        M = k.shape[2]
        if causal:
            i = torch.arange(L, device=x_BLD.device)[:, None] + (M - L)
            mask_LM = torch.arange(M, device=x_BLD.device)[None, :] <= i  # [L, M]
        if self.softcap is None:
            gqa = self.kv_heads != self.heads
            if gqa and _EXPAND_KV_HEADS:
                rep = self.heads // self.kv_heads
                k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LM, enable_gqa=gqa)
        else:
            out = self._capped(q, k, v, mask_LM)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))

    def _capped(self, q, k, v, mask_LM):
        """Soft-capped attention [B, H, L, E]; the query heads that share a key/value head go side by side
        ([B, G, rep*L, E]: no copies of the keys and values).

        cap * tanh(u) is computed as 2 cap * sigmoid(2u): the same attention weights (softmax drops the constant
        -cap), because torch's CPU tanh is single-threaded and several times slower than its sigmoid
        (docs/results.md, 2026-11-30, "CPU kernel timings"); in float32 the capped logits carry an absolute error
        of ~1e-7 x cap, so a cap far above the logits (> 1e3, effectively none) keeps the tanh form. The argument's
        scale 2 / (sqrt(E) cap) goes into the queries (L x E values, not L x M), the sigmoid runs in place, and the
        gain 2 cap and the mask's -inf are one add: two passes over the score matrix after the product, where there
        were five."""
        B, H, L, E = q.shape
        G, M = k.shape[1], k.shape[2]
        rep = H // G
        cap = self.softcap
        tanh_form = cap > 1e3
        q = q * ((1 if tanh_form else 2) / (math.sqrt(E) * cap))
        logits = (q.reshape(B, G, rep * L, E) @ k.transpose(-1, -2)).float()  # [B, G, rep*L, M]
        w = logits.tanh_() if tanh_form else logits.sigmoid_()
        gain = cap if tanh_form else 2 * cap
        if mask_LM is None:
            logits = w * gain
        else:  # [L, M], or per batch row [B, 1, L or 1, M]
            m = mask_LM[:, :, None] if mask_LM.dim() == 4 else mask_LM
            bias = torch.zeros(m.shape, dtype=w.dtype, device=w.device).masked_fill_(~m, float("-inf"))
            logits = torch.add(bias, w.view(B, G, rep, L, M), alpha=gain).view(B, G, rep * L, M)
        return (_softmax(logits).to(v.dtype) @ v).view(B, H, L, E)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; on the CPU, for short rows (a time-attention call over a few cached frames),
    written out: torch's CPU kernel takes several times longer there (docs/results.md, 2026-11-30, "CPU kernel
    timings")."""
    if x.device.type != "cpu" or x.shape[-1] > 16 or torch.compiler.is_compiling():
        return x.softmax(-1)
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e / e.sum(-1, keepdim=True)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3 + 7) // 8 * 8
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
