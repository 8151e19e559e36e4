"""Names that become paths. Manifests, registries and run folders are files users share; a name read from one (a
source, a camera key, a repo id, a run name) is checked before it is joined to a root, so that `../../x` can never
make a stage write, read or delete outside the folder it was given.

`safe_component` validates one path component (a safe character set, no `.`/`..`, bounded length);
`safe_relative` a relative path of such components (a repo id `org/name`, a data file under a dataset root);
`inside` joins a relative path to a root and refuses anything that resolves outside it (symlinks included);
`holds` says whether deleting a folder would delete a given path (the working directory, say).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.stage import UserError

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+@-]*")
MAX_COMPONENT = 200


def safe_component(value: object, what: str, fix: str = "") -> str:
    """`value` if it is one safe path component (letters, digits, `_ . = + @ -`, not starting with `.` or `-`,
    at most 200 characters), else a UserError naming `what` (e.g. "source name in manifests/x.parquet") and
    the fix."""
    text = value if isinstance(value, str) else None
    if text is None or not _COMPONENT.fullmatch(text) or len(text) > MAX_COMPONENT or text in (".", ".."):
        hint = f" {fix}" if fix else ""
        raise UserError(f"{what} {value!r} is not a safe name (one path component of letters, digits and "
                        f"_ . = + @ -, at most {MAX_COMPONENT} characters, not starting with . or -).{hint}")
    return text


def safe_relative(value: object, what: str, fix: str = "", *, max_parts: int = 8) -> str:
    """`value` if it is a relative path of safe components separated by `/` (e.g. a repo id `org/name`, a data
    file `data/chunk-000/file-000.parquet`), else a UserError naming `what` and the fix."""
    text = value if isinstance(value, str) else None
    parts = text.split("/") if text else []
    if not parts or len(parts) > max_parts:
        raise UserError(f"{what} {value!r} is not a relative path of at most {max_parts} safe names. {fix}".rstrip())
    for p in parts:
        safe_component(p, what, fix)
    return text


def inside(root: Path, relative: str | Path, what: str, fix: str = "", *, bound: Path | None = None) -> Path:
    """`root / relative`, refused (UserError naming `what`) when it resolves outside `bound` (default `root`):
    `..`, an absolute path, or a symlink that leads out. `bound` widens the confinement for a root whose files are
    links into a fixed neighbour (a Hugging Face cache snapshot links into its repo folder's `blobs/`)."""
    try:
        root_r = Path(root).resolve()
        limit = Path(bound).resolve() if bound is not None else root_r
        target = (root_r / relative).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a name too long for the file system, a symlink loop
        raise UserError(f"{what} {str(relative)!r} is not a usable path under {root} ({e}). {fix}".rstrip()) from None
    if target != limit and limit not in target.parents:
        raise UserError(f"{what} {str(relative)!r} leads outside {limit} (to {target}). "
                        f"{fix or 'A manifest or registry may only name files under its root.'}")
    return target


def holds(folder: Path, path: Path) -> bool:
    """True when `folder` is `path` or one of its ancestors (both resolved): deleting `folder` would delete `path`."""
    folder_r, path_r = Path(folder).resolve(), Path(path).resolve()
    return folder_r == path_r or folder_r in path_r.parents
