"""The run folder's owner: `<run>/LOCK` names the one live training process that trains into it (`RunLock`)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.stage import UserError, is_stale, owner_tag

log = logging.getLogger("trainer.runs")  # the name it logged under before it had a module of its own

LOCK = "LOCK"


@dataclasses.dataclass
class RunLock:
    """A run folder is owned by one live training process: `<run>/LOCK` names it (`owner_tag()`, host, pid, start).
    A second process is refused while the owner lives; the lock of an owner that is gone is taken over (the rule
    for every writer's leftovers, `pipeline.stage.is_stale`: a dead process of this host, or, on another host, a
    lock nothing touched for 6 h; the owner touches it as it trains, `heartbeat`)."""

    path: Path
    tag: str
    created_dir: bool = False
    touched: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path, tag = run_dir / LOCK, owner_tag()
        body = {"owner": tag, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for debris in run_dir.glob(f".{LOCK}.*"):  # a lock being made or taken over by a process killed meanwhile
            if is_stale(debris.name.split(".", 2)[2].removeprefix("stale."), debris):
                debris.unlink(missing_ok=True)
        for _ in range(10):
            if _create(path, body):
                return cls(path, tag, created)
            holder = _read_lock(path)
            if holder is None:  # gone between the two calls: try again
                continue
            if not is_stale(str(holder.get("owner", "")), path):
                if created:
                    _rmdir_if_empty(run_dir)
                raise UserError(_in_use(run_dir, holder))
            _take_over(path, holder)
        raise UserError(f"{path}: could not take the run's lock (other processes keep taking it); try again")

    def heartbeat(self, every_s: float = 60.0) -> None:
        """Touch the lock (at most every `every_s`): a live owner on another host never looks stale."""
        if time.monotonic() - self.touched >= every_s:
            self.touched = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self, *, failed: bool = False) -> None:
        """Remove the lock if it is still this process's; after a failed start, also the folder it created for
        nothing."""
        holder = _read_lock(self.path)
        if holder is not None and holder.get("owner") == self.tag:
            self.path.unlink(missing_ok=True)
        if failed and self.created_dir:
            _rmdir_if_empty(self.path.parent)


def _create(path: Path, body: dict[str, Any]) -> bool:
    """Create the lock with its whole content at once (a hard link of a finished file), False if one exists."""
    text = json.dumps(body) + "\n"
    tmp = path.with_name(f".{LOCK}.{body['owner']}")
    try:
        tmp.write_text(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK) or \
                not tmp.is_file():
            raise
    finally:
        tmp.unlink(missing_ok=True)
    try:  # a file system without hard links: create-if-absent, then write (a reader may see it empty meanwhile)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when there is none; {} for a file that is not a lock this code wrote (it is stale
    after 6 h untouched, like another host's)."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _take_over(path: Path, holder: dict[str, Any]) -> None:
    """Move a stale lock aside (one process wins the rename); if what was moved is not the lock judged stale
    (another process took over in between), put it back."""
    aside = path.with_name(f".{LOCK}.stale.{owner_tag()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:
        try:
            os.link(aside, path)
        except OSError:
            pass
    else:
        log.warning("%s: took over the lock of %s, which is gone", path.parent, _owner(holder))
    aside.unlink(missing_ok=True)


def _owner(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unknown owner (the lock file is not one wmctl wrote)"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


def _in_use(run_dir: Path, holder: dict[str, Any]) -> str:
    here = holder.get("host") == socket.gethostname()
    gone = "once that process is gone" if here else "6 h after it was last touched (its host cannot be seen from here)"
    return (f"{run_dir} is in use by a training process ({_owner(holder)}); wait for it to end or stop it (SIGTERM: "
            f"it writes a checkpoint and exits 3), or train into another --out. Its lock {run_dir / LOCK} is taken "
            f"over {gone}")


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
