"""The rollouts' key/value caches of the time-attention layers: `TimeKVCache` (the committed frames of the current
window, eval's exact sliding), `RingKVCache` (the planner's preallocated slots, written in place) and `Prefill`, a
committed window the rollouts start from (`trainer.sampling`)."""

from __future__ import annotations

import dataclasses
import functools

import torch


class TimeKVCache:
    """Keys/values of each time-attention layer for the committed frames of the current window."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def hook(self, layer: int, angles: torch.Tensor, commit: int):
        """The KV hook of one pass: attend to the cache plus the pass's own frames; keep the first `commit`
        of them (frames that are final: context, or a generated frame at the context noise level)."""

        def time_kv(attn, h_LTD: torch.Tensor):
            k_new, v_new = attn.project_kv(h_LTD, angles)  # [B*S, G, T_new, E]
            if layer in self.k:
                k, v = torch.cat([self.k[layer], k_new], dim=2), torch.cat([self.v[layer], v_new], dim=2)
            else:
                k, v = k_new, v_new
            if commit:
                end = k.shape[2] - k_new.shape[2] + commit
                # contiguous: one memory layout whatever the length (one compiled variant, see compile_for_rollouts)
                self.k[layer] = k[:, :, :end].contiguous()
                self.v[layer] = v[:, :, :end].contiguous()
            return k, v

        return time_kv

    def for_pass(self, angles: torch.Tensor, pos: int, frames: int, commit: int):
        """`time_kv(layer)` of a pass over `frames` frames from time position `pos` (see `hook`)."""
        return lambda layer: self.hook(layer, angles, commit)

    def expand(self, batch: int) -> TimeKVCache:
        """This cache (made for a batch of 1) repeated for `batch` rollouts (every candidate shares a context)."""
        out = TimeKVCache()
        for store, dst in ((self.k, out.k), (self.v, out.v)):
            for layer, x in store.items():
                x = x.view(1, -1, *x.shape[1:])  # [1, S, G, T, E]
                dst[layer] = x.expand(batch, *x.shape[1:]).reshape(-1, *x.shape[2:])
        return out


class RingKVCache:
    """The planner's cache: keys/values of each time-attention layer in preallocated slots, written in place (no
    concatenation, no copies of the cache, one shape for every pass).

    `window + 1` slots hold the `window - 1` committed frames the oldest frame of a pass sees plus up to two
    frames of the pass itself (a frame being committed and the next frame's draft); a rollout that ends inside
    the window needs only its own frames (`frames`: context + horizon; a 7-frame plan of a 64-frame model keeps
    7 slots, not 65). A slot is reused once its frame has left the window of every later frame, and attention
    covers all slots under a mask built from the slots' time positions. Made from a `Prefill` of batch 1 (a
    shared context, broadcast into every rollout's slots) or of the rollout's batch. Inside the window this is
    `TimeKVCache` exactly (the same keys at the same positions, so it equals `rollout_uncached`). Past the window
    it slides without a re-commit pass: the frames that stay keep the keys they were committed with (when older
    frames were still visible), as streaming transformers do - one pass per frame cheaper, no longer equal to the
    reference there (rotary positions keep the offsets the same). `inplace=False` writes out of place
    (differentiable rollouts: autograd keeps each pass's keys)."""

    def __init__(self, pre: Prefill, batch: int, window: int, *, frames: int | None = None, inplace: bool = True):
        n, b = len(pre.committed), pre.committed[0].shape[0]
        self.window, self.inplace = window, inplace
        self.slots = window + 1 if frames is None else max(n + 1, min(window + 1, frames))
        if n > window - 1:
            raise ValueError(f"a prefill of {n} frames does not fit a window of {window}")
        if b not in (1, batch):
            raise ValueError(f"a prefill of batch {b} cannot start {batch} rollouts")
        self.pos: list[int | None] = [*range(n), *[None] * (self.slots - n)]  # time position held by each slot
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for src, dst in ((pre.cache.k, self.k), (pre.cache.v, self.v)):
            for layer, x in src.items():  # [b * S, G, n, E]
                _, G, _, E = x.shape
                S = x.shape[0] // b
                buf = x.new_zeros(batch, S, G, self.slots, E)  # zeros, not empty: masked slots still meet @ v
                buf[:, :, :, :n] = x.view(b, S, G, n, E)
                dst[layer] = buf.view(batch * S, G, self.slots, E)

    def for_pass(self, angles: torch.Tensor, pos: int, frames: int, commit: int):
        """Slots for the pass's frames (positions pos..pos+frames-1; a frame already in a slot, a draft being
        refined or committed, keeps it) and the "may attend" mask [frames, slots]; `time_kv(layer)` writes the
        pass's keys/values into their slots and returns the whole buffer with the mask. Every frame stays in
        its slot until the window leaves it behind, so `commit` needs no bookkeeping here."""
        del commit
        oldest = pos - self.window + 1  # the first frame of the pass sees frames >= oldest
        slots: list[int] = []
        for p in range(pos, pos + frames):
            if p in self.pos:
                slot = self.pos.index(p)
            else:
                free = [i for i, q in enumerate(self.pos) if (q is None or q < oldest) and i not in slots]
                if not free:
                    raise RuntimeError(f"no free slot for frame position {p} in {self.pos}")
                slot = free[0]
            slots.append(slot)
        for slot, p in zip(slots, range(pos, pos + frames)):
            self.pos[slot] = p
        dev = next(iter(self.k.values())).device
        mask, idx = _slot_tensors(self.window, pos, frames, tuple(self.pos), tuple(slots), dev)

        def time_kv(layer: int):
            def kv(attn, h_LTD: torch.Tensor):
                k_new, v_new = attn.project_kv(h_LTD, angles)  # [B*S, G, frames, E]
                if self.inplace:
                    self.k[layer].index_copy_(2, idx, k_new.to(self.k[layer].dtype))
                    self.v[layer].index_copy_(2, idx, v_new.to(self.v[layer].dtype))
                else:
                    self.k[layer] = self.k[layer].index_copy(2, idx, k_new)
                    self.v[layer] = self.v[layer].index_copy(2, idx, v_new)
                return self.k[layer], self.v[layer], mask

            return kv

        return time_kv


@functools.lru_cache(maxsize=512)
def _slot_tensors(window: int, pos: int, frames: int, slot_pos: tuple[int | None, ...], slots: tuple[int, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The "may attend" mask [frames, slots] and the slot indices of one `RingKVCache` pass, made once per
    schedule and device: a rollout of one shape meets the same few every call, and a CUDA graph must not
    copy host data to the device while it is captured (`CapturedRollout`). Read-only."""
    mask = torch.tensor([[q is not None and p - window < q <= p for q in slot_pos] for p in range(pos, pos + frames)],
                        dtype=torch.bool, device=device)
    return mask, torch.tensor(slots, device=device)


@dataclasses.dataclass
class Prefill:
    """A committed window: the keys/values of frames `start`.. (time positions 0..), the committed frames
    themselves (at the context noise level, kept to rebuild the cache when the window slides) and the next
    frame's index."""

    cache: TimeKVCache
    committed: list[torch.Tensor]  # [B, 1, N, Z] each: the frames start .. frames-1 as the model saw them
    start: int  # absolute index of the window's first frame (time position 0)
    tau: float  # signal level of the committed frames (1 - ctx_noise)

    @property
    def frames(self) -> int:
        """Absolute index of the next frame to generate (context frames Tc at first)."""
        return self.start + len(self.committed)

    @property
    def prev(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B, 1, N, Z], tau [B, 1]) of the last committed frame: the next frame's temporal prior."""
        z = self.committed[-1]
        return z, torch.full((z.shape[0], 1), self.tau, device=z.device, dtype=z.dtype)

    def expand(self, batch: int) -> Prefill:
        return Prefill(self.cache.expand(batch), [z.expand(batch, *z.shape[1:]) for z in self.committed], self.start,
                       self.tau)
