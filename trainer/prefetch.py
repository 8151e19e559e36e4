"""The training step's batches on their way to the device: read ahead in a thread or DataLoader workers, copied in
pinned memory on a side stream, and the autocast the step and validation run under."""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Any

import torch

from featurestore.reader import TokenReader
from trainer.config import TrainConfig
from trainer.data import SAMPLE_IDS, StepBatches
from trainer.precision import uses_bf16
from trainer.run_setup import Trainer


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg.precision, device) else nullcontext()


def _loader(reader: TokenReader, tr: Trainer, start: int):
    """This rank's micro-batches of steps start, start+1, ...; on CUDA in pinned memory, already on their way to
    the device (`DevicePrefetch`), so the step does not wait for the host."""
    ds = StepBatches(reader, tr.cfg, tr.stats, tr.shape, start_step=start, rank=tr.d.rank, world=tr.d.world)
    cuda = tr.device.type == "cuda"
    if tr.cfg.num_workers == 0:
        batches = ThreadPrefetch(iter(ds)) if cuda else iter(ds)
    else:
        batches = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=tr.cfg.num_workers,
                                                   multiprocessing_context="forkserver", persistent_workers=True,
                                                   prefetch_factor=4, pin_memory=cuda))
    return DevicePrefetch(batches, tr.device) if cuda else batches


class ThreadPrefetch:
    """Reads the next steps' batches in a background thread (no DataLoader workers): the host reads the store
    while the device computes."""

    def __init__(self, batches, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._fill, args=(batches,), daemon=True, name="batch-prefetch")
        self.thread.start()

    def _fill(self, batches) -> None:
        try:
            for b in batches:
                self.q.put(b)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
            self.q.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item


class DevicePrefetch:
    """Keeps the next step's micro-batches copying to the device (pinned memory, a side stream) while the
    current step computes: `next()` hands over batches that are already there."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = batches, device
        self.stream = torch.cuda.Stream(device)
        self.next = self._load()

    def _load(self) -> list[dict[str, Any]]:
        micro = next(self.batches)
        with torch.cuda.stream(self.stream):
            return [_to(b, self.device, pin=True) for b in micro]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        out = self.next
        for b in out:  # the tensors were made on the side stream: tell the allocator the main stream uses them
            for v in b.values():
                if torch.is_tensor(v) and v.device.type == "cuda":
                    v.record_stream(torch.cuda.current_stream(self.device))
        self.next = self._load()
        return out


def _to(batch: dict[str, Any], device: torch.device, pin: bool = False) -> dict[str, Any]:
    def move(k, v):
        if not torch.is_tensor(v) or k == SAMPLE_IDS:
            return v
        if pin and not v.is_pinned():
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    return {k: move(k, v) for k, v in batch.items()}
