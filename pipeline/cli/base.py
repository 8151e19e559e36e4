"""What every command module shares: the app class that maps errors to exit codes (the one place: a `UserError` is
exit 2, an `OSError` exit 4 or 2, anything else exit 5), the error line, the console, and the parsers of
hand-written option values."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from pipeline.machine import DEVICE_HELP
from pipeline.overrides import SET_HELP
from pipeline.stage import UserError

log = logging.getLogger(__name__)

EXIT_USER, EXIT_MACHINE, EXIT_CRASH = 2, 4, 5

# errno -> (what happened, the fix). The first group means the path given is wrong (exit 2), the rest that the
# machine refused (exit 4): the disk, the file system, the permissions, the limits
_PATH_WRONG = {
    errno.ENOTDIR: ("a part of this path is a file where a folder is expected",
                    "remove or rename that file, or choose another path"),
    errno.EEXIST: ("this exists and is not a folder: a file where a folder is expected",
                   "remove or rename it, or choose another path"),
    errno.EISDIR: ("this is a folder where a file is expected", "choose a file path, or remove the folder"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter name or folder (at most 255 bytes a name)"),
    errno.ELOOP: ("too many levels of symbolic links (a symlink loop)",
                  "fix or remove the looping link, or choose another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
}
_MACHINE = {
    errno.ENOSPC: ("no space left on the device", "free space there (or choose a folder on a disk with room) and "
                   "run the same command again: what was committed is kept"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota (`quota -s`) or choose another disk, and "
                   "run the same command again: what was committed is kept"),
    errno.EROFS: ("read-only file system", "choose a writable folder (or remount it read-write)"),
    errno.EACCES: ("permission denied", "choose a folder you can write (and read), or ask its owner for access"),
    errno.EPERM: ("operation not permitted", "choose a folder you own, or ask its owner for access"),
    errno.EIO: ("input/output error", "the disk or network file system failed: check it (dmesg) and run again"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n 65536`) and run again"),
    errno.ENFILE: ("too many open files on this machine", "close other programs or raise fs.file-max"),
    errno.ENOMEM: ("out of memory", "free memory or use smaller batches, and run again"),
    errno.ESTALE: ("stale file handle (network file system)", "run the same command again"),
}


def fail(message: str, code: int = EXIT_USER) -> None:
    typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, one it was raised from, or one a library folded into its message (Rust I/O
    errors of safetensors end in `(os error 28)`)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    found = re.search(r"\(os error (\d+)\)|\[errno (\d+)\]", str(e), re.IGNORECASE)
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code))
    return None


def os_error_line(e: OSError, paths: list[Path] | None = None) -> tuple[str, int]:
    """One line for an OSError: the path, what happened, the fix; and its exit code (2: the path given is wrong,
    4: the machine refused). A write on a full disk names no file: then the path options of the command stand in
    (for a full disk, the one on the fullest file system)."""
    what, fix = _links(e) or _PATH_WRONG.get(e.errno) or _MACHINE.get(e.errno) or (
        (e.strerror or str(e)).lower(), "check the path and the machine, then run the same command again")
    code = EXIT_USER if e.errno in _PATH_WRONG else EXIT_MACHINE
    name = errno.errorcode.get(e.errno or 0, "OSError")
    if e.filename is not None:
        where = f"{os.fsdecode(e.filename)}" + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 else "")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT) and paths:
        fullest = min(paths, key=_free_bytes)
        where = f"the disk holding {fullest} ({_free_bytes(fullest) / 1e6:.1f} MB free now)"
    elif paths:
        where = "writing under " + ", ".join(str(p) for p in paths)
    else:
        where = os.getcwd()
    return f"{where}: {what} ({name}). {fix[0].upper()}{fix[1:]}", code


def _links(e: OSError) -> tuple[str, str] | None:
    """A path that "exists and is not a folder" because it is a symbolic link that leads nowhere: say which."""
    if e.errno not in (errno.EEXIST, errno.ENOTDIR) or e.filename is None or not os.path.islink(e.filename):
        return None
    try:
        os.stat(e.filename)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return _PATH_WRONG[errno.ELOOP]
        return (f"a symbolic link to {os.readlink(e.filename)}, which does not exist",
                "create what it points to, remove the link, or choose another path")
    return None


def _free_bytes(path: Path) -> float:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
        return float(st.f_bavail * st.f_frsize)
    except OSError:
        return float("inf")


class WmctlGroup(TyperGroup):
    """A command group that maps what a command raises to one red line and an exit code: `UserError` 2, `OSError`
    4 (the machine refused: disk full, read-only, permission) or 2 (the path is wrong: a file where a folder should
    be, a name too long, a symlink loop), anything else 5 (a bug: the traceback, then the line)."""

    def resolve_command(self, ctx, args):  # noqa: D102 - click's signature; remembers the command for error lines
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, TyperGroup):
            ctx.meta["wmctl.command"] = (name, cmd, list(rest), ctx)
        return name, cmd, rest

    def invoke(self, ctx):  # noqa: D102 - click's signature
        try:
            return super().invoke(ctx)
        except UserError as e:
            fail(str(e), e.exit_code)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors, exits: click's own handling
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns a crash into an exit code
            found = os_error_in(e)
            if found is not None:
                line, code = os_error_line(found, _path_options(ctx))
                log.debug("%s", "".join(traceback.format_exception(e)))
                fail(line, code)
            traceback.print_exc()
            fail(f"wmctl stopped on an unexpected {type(e).__name__}: {e} (a bug: the traceback above says where; "
                 "please report it with the command line)", EXIT_CRASH)


def _path_options(ctx) -> list[Path]:
    """The path-valued options (given or default) of the command that failed."""
    found = ctx.meta.get("wmctl.command")
    if not found:
        return []
    name, cmd, args, parent = found
    try:
        sub = cmd.make_context(name, list(args), parent=parent, resilient_parsing=True)
    except Exception:  # noqa: BLE001 - best effort: the error line then names no option
        return []
    out: list[Path] = []
    for value in sub.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, Path):
                out.append(v)
    return out


def new_app(help: str, cls: type[WmctlGroup] = WmctlGroup, **kw: Any) -> typer.Typer:
    """A command group of wmctl (`cls`: `WmctlGroup`, or a `pipeline.cli.lazy.LazyGroup` with its table)."""
    return typer.Typer(help=help, cls=cls, no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False, **kw)


AutoDevice = Annotated[str, typer.Option(help=DEVICE_HELP)]  # every --device (`pipeline.machine.resolve_device`)
# every stage's `--set key=value` but train's (`pipeline.overrides.apply_set`)
Sets = Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)]


def console():
    """A rich console; in batch logs (not a terminal: SLURM, CI) wide enough that tables keep their columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=160)


def split_list(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else ()


def int_list(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in split_list(text))
    except ValueError:
        raise UserError(f"expected comma-separated integers, got {text!r}") from None


def hxw(text: str, option: str = "--image-size", example: str = "224 or 224x400") -> tuple[int, int]:
    """'N' or 'HxW' -> (H, W); a clear error naming the option otherwise."""
    try:
        h, _, w = text.lower().partition("x")
        size = int(h), int(w or h)
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"{option} {text!r}: expected N or HxW (positive integers), e.g. {example}")
    return size


def print_result(title: str, result: dict) -> None:
    """A benchmark's figures as a two-column table, then as one JSON line (the last line, for scripts)."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in result.items():
        table.add_row(k, f"{v:.3g}" if isinstance(v, float) else str(v))
    console().print(table)
    typer.echo(json.dumps(result))


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters the command line set (not left at their defaults)."""
    return {p.name for p in ctx.command.params  # typer ships its own click: compare the source by name
            if getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
