"""Stage plumbing shared by every `run_<stage>`: shard specs, atomic writes, config fingerprints.

Contract (the stages: README.md, "Stages and commands"; what each survives: docs/reliability.md): a stage reads
only committed output of the stage before it, writes so
that a crash leaves the old state or the new one (temp path + `os.replace`, or a marker written last),
is idempotent (same config: nothing to do; changed config: refused unless forced) and can be split
over independent processes with `--shard I/N`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A problem the user must fix (bad path, bad config, incompatible store). Printed as one line, exit 2."""

    exit_code = 2


class NoSpaceError(UserError):
    """The machine cannot hold what a stage would write (a disk too full for the projected size): exit 4, like a
    write that met ENOSPC, since the fix is the same (free space or choose another disk, then run again)."""

    exit_code = 4


class ConfigMismatchError(UserError):
    """An output exists that was made with a different config."""

    def __init__(self, what: str, differences: list[str], hint: str):
        self.differences = differences
        super().__init__(f"{what} was made with a different config ({'; '.join(differences)}). {hint}")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """`I/N`: this process does the work units whose index is congruent to I modulo N."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(f"--shard {self.index}/{self.count}: need 0 <= I < N (e.g. --shard 0/4)")

    @classmethod
    def parse(cls, text: str | None) -> ShardSpec:
        if not text:
            return cls()
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            hint = "e.g. --shard 3/16 (SLURM: --shard $SLURM_ARRAY_TASK_ID/N)"
            raise UserError(f"--shard {text!r}: expected I/N, {hint}") from None
        return cls(i, n)

    def owns(self, unit_index: int) -> bool:
        return unit_index % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON types (for configs saved beside outputs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (16 hex chars are plenty for a config id)."""
    blob = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable `field: old -> new` lines for every leaf that differs (nested dicts flattened)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, prefix=f"{name}."))
        elif to_jsonable(a) != to_jsonable(b):
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any, limit: int = 60) -> str:
    text = json.dumps(to_jsonable(v)) if not isinstance(v, str) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_UMASK_LOCK = threading.Lock()
_UMASK_SWAPPED: int | None = None


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (`/proc/self/status`, Linux 4.7+);
    elsewhere set and restored once per process under a lock (other threads could create files in that instant)."""
    global _UMASK_SWAPPED
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        if _UMASK_SWAPPED is None:
            _UMASK_SWAPPED = os.umask(0o022)
            os.umask(_UMASK_SWAPPED)
        return _UMASK_SWAPPED


def apply_umask(path: Path, *, tree: bool = False) -> None:
    """Give `path` the mode a plain `open`/`mkdir` would have (0o666 / 0o777 less the umask): what `mkstemp`,
    `mkdtemp` and some writers (safetensors) create as 0600/0700 before it is renamed into place, so that teammates
    sharing a store or a run can read it. `tree`: every file and folder under a folder too."""
    umask = current_umask()
    paths = [Path(path)]
    if tree and Path(path).is_dir():
        paths += sorted(Path(path).rglob("*"))
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _name_the_file(e: OSError, path: Path) -> OSError:
    """`e` naming `path` when it names no file (a write or fsync that failed on a full disk names none)."""
    if e.filename is None and e.errno is not None:
        return type(e)(e.errno, os.strerror(e.errno), str(path))
    return e


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (with any writer: PIL, safetensors, a video muxer); on success it
    gets the umask's mode and is renamed onto `path`, on any error it is removed: `path` is the old file or the
    whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _name_the_file(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a torn one. The file gets the
    mode the umask gives (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _name_the_file(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def owner_tag() -> str:
    """`host.pid.random`: names a staging path so that a relaunch can tell its own debris from a live writer's."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def tag_is_dead(tag: str) -> bool:
    """True when a staging tag from `owner_tag()` names a process on this host that no longer runs."""
    try:
        host, pid_text, _ = tag.rsplit(".", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


STALE_AFTER_S = 6 * 3600  # a writer on another host that has not touched its debris for this long is gone


def is_stale(tag: str, path: Path, *, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> bool:
    """The one rule for a writer's leftovers (a staging segment, a temporary checkpoint), given its owner tag
    (`owner_tag()`): stale when the owner is a process of this host that no longer runs, or, for an owner on
    another host (whose processes cannot be seen from here, e.g. a SLURM job requeued elsewhere), when nothing
    under `path` changed for `max_age_s`. Committed outputs are never leftovers: callers check that first."""
    if tag_is_dead(tag):
        return True
    try:
        host = tag.rsplit(".", 2)[0]
    except ValueError:
        return False
    if host == socket.gethostname():
        return False  # a live local process
    return (now or time.time()) - newest_mtime(path) > max_age_s


def newest_mtime(path: Path) -> float:
    path = Path(path)
    times = [path.stat().st_mtime] if path.exists() else [0.0]
    for root, _, files in os.walk(path):
        for name in files:
            try:
                times.append(os.stat(os.path.join(root, name)).st_mtime)
            except OSError:
                pass
    return max(times)


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A phase boundary the fault-injection tests can stop a process at: `WMCTL_FAULT=name[:n][:TERM]` sends this
    process SIGKILL (no cleanup at all; SIGTERM with `:TERM`) the n-th time (default first) it passes `name`.
    Unset, it costs one environment lookup."""
    spec = os.environ.get("WMCTL_FAULT")
    if not spec:
        return
    point, *rest = spec.split(":")
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    nth = int(rest[0]) if rest and rest[0].isdigit() else 1
    if _FAULT_COUNTS[name] == nth:
        import signal

        os.kill(os.getpid(), signal.SIGTERM if "TERM" in rest else signal.SIGKILL)
