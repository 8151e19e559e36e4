"""What a CUDA graph capture forbids, caught on the CPU: host data copied to the device (a tensor made from
Python values: `torch.tensor([...])`, indexing with a list) and device values read back on the host (`.item()`,
`bool(t)`, `nonzero`). Either breaks a capture or bakes one call's values into every replay. Python scalars
(0-d tensors, e.g. `t.fill_(1)`) are kernel arguments and fine."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class HostDataAudit(TorchDispatchMode):
    """Records, in `seen`, every op dispatched inside it that a CUDA graph capture would refuse or freeze."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if (name.startswith("aten.lift_fresh") and out.numel() > 1) or "_local_scalar_dense" in name \
                or "nonzero" in name:
            self.seen.append(name)
        return out
