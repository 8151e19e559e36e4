"""Dataset registry: one small TOML file per named dataset.

Files are looked up, first match wins, in the directories of `$WMCTL_REGISTRY` (colon-separated), then
`./registry/`, then the built-in `pipeline/registry/`. A user adds a dataset by adding a file
`<name>.toml` to any of them; `make encode DATASET=<name>` resolves through here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from pathlib import Path

from pipeline.names import safe_relative
from pipeline.rates import ACTION_KINDS
from pipeline.stage import UserError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "registry"
_WARNED: set[str] = set()  # WMCTL_REGISTRY entries already warned about (once per process)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """One registered dataset.

    name: registry name (the file stem). repo_id: Hugging Face repo id (also the lerobot id of a local root). root:
    local dataset directory; empty means where the installed lerobot keeps `repo_id` (`$HF_LEROBOT_HOME/<repo_id>`,
    or with lerobot 0.5+ its Hub cache under `$HF_LEROBOT_HOME/hub`). cameras: camera keys to use (empty: all video
    features). camera_slots: the model's camera slot of each camera key, by role (e.g. {exterior_1 = "...left",
    wrist = "...wrist_left"}): sources with other cameras (another robot) share a model by slot, and a slot a
    source lacks is masked out. use_actions: False treats the set as action-free even when it has an `action`
    feature. mix_weight:
    share of this source in the training mix. val_fraction: share of episodes held out (deterministic by hash).
    """

    name: str
    repo_id: str
    root: str = ""
    cameras: tuple[str, ...] = ()
    camera_slots: tuple[tuple[str, str], ...] = ()  # (slot, camera key) pairs, from a TOML table
    # the robot: sources of one embodiment share state statistics and the model's embodiment embedding
    # (default: one embodiment per state width)
    embodiment: str = ""
    use_actions: bool = True
    mix_weight: float = 1.0
    val_fraction: float = 0.1
    split_by: str = ""  # group splits: a per-episode metadata column, `task`, or `task:REGEX` (see ingest)
    # how actions add up over several frames, for storing or training at a lower rate: "delta" (summed), "absolute"
    # (the last), "velocity" (the mean: the command held over the step); one kind, or one per action dimension
    # (e.g. ["delta", "delta", "delta", "absolute"] for delta xyz and an absolute gripper)
    action_kind: str | tuple[str, ...] = ""
    description: str = ""
    path: str = ""  # the file it came from

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"{self.path}: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.mix_weight < 0:
            raise UserError(f"{self.path}: mix_weight must be >= 0, got {self.mix_weight}")
        kinds = (self.action_kind,) if isinstance(self.action_kind, str) else self.action_kind
        bad = [k for k in kinds if k not in ACTION_KINDS and k != ""]
        if bad:
            raise UserError(f"{self.path}: action_kind {bad}: each must be one of {list(ACTION_KINDS)}")
        keys = [k for _, k in self.camera_slots]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise UserError(f"{self.path}: camera_slots puts {twice} in more than one slot; one slot per camera")
        if self.cameras:
            unknown = sorted(set(keys) - set(self.cameras))
            if unknown:
                raise UserError(f"{self.path}: camera_slots names {unknown}, which are not in `cameras` "
                                f"{list(self.cameras)}; add them there or fix the key")
            missing = [c for c in self.cameras if c not in keys]
            if self.camera_slots and missing:
                raise UserError(f"{self.path}: cameras {missing} have no slot in camera_slots; give each camera a "
                                "slot (e.g. wrist = \"" + missing[0] + "\")")

    def resolved_root(self) -> Path:
        if self.root:
            return Path(os.path.expandvars(os.path.expanduser(self.root)))
        from pipeline.lerobot_compat import default_root

        return default_root(self.repo_id)


def search_dirs() -> list[Path]:
    dirs = []
    for p in os.environ.get("WMCTL_REGISTRY", "").split(":"):
        if not p:
            continue
        if Path(p).is_dir():
            dirs.append(Path(p))
        elif p not in _WARNED:
            _WARNED.add(p)
            what = "a file" if Path(p).exists() else "missing" if not Path(p).is_symlink() else "a broken link"
            log.warning("WMCTL_REGISTRY entry %s is not a folder (%s): ignored; it must name folders of <name>.toml "
                        "files, colon-separated", p, what)
    return [*dirs, Path("registry"), BUILTIN_DIR]


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(search_dirs()):  # earlier dirs override later ones
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found[f.stem] = f
    return dict(sorted(found.items()))


def load_spec(path: Path) -> DatasetSpec:
    raw = _read_toml(Path(path))
    fields = {f.name for f in dataclasses.fields(DatasetSpec)} - {"name", "path"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    if "repo_id" not in raw:
        raise UserError(f"{path}: missing `repo_id` (a Hugging Face id, or any id for a local root)")
    for key, value in raw.items():
        _check_type(path, key, value)
    _check_repo_id(path, raw["repo_id"])
    raw["cameras"] = tuple(raw.get("cameras", ()))
    raw["camera_slots"] = tuple(raw.get("camera_slots", {}).items())
    if isinstance(raw.get("action_kind"), list):
        raw["action_kind"] = tuple(raw["action_kind"])
    return DatasetSpec(name=Path(path).stem, path=str(path), **raw)


def _read_toml(path: Path) -> dict:
    """The TOML table of a registry file; a UserError naming the file when it cannot be read as one."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a TOML file: rename it (registry folders hold <name>.toml files)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): fix its permissions or remove it") from None


def _check_repo_id(path: Path, repo_id: str) -> None:
    """A repo id becomes a folder under $HF_LEROBOT_HOME: `org/name` of safe names, never `..` or absolute."""
    try:
        safe_relative(repo_id, "repo_id", max_parts=2)
    except UserError:
        raise UserError(f"{path}: `repo_id` {repo_id!r} is not a repo id: it becomes a folder under $HF_LEROBOT_HOME, "
                        "so it must be org/name (letters, digits, _ . = + @ -, no `..`, not absolute), e.g. repo_id = "
                        "\"lerobot/pusht\"") from None


# the TOML type of every key: a wrong type is refused, never coerced (`use_actions = "false"` is not False)
FIELD_TYPES = {"repo_id": "string", "root": "string", "description": "string", "split_by": "string",
               "embodiment": "string",
               "cameras": "list of strings", "camera_slots": "table of strings",
               "use_actions": "boolean (true/false)", "mix_weight": "number", "val_fraction": "number",
               "action_kind": "string or list of strings"}


def _check_type(path: Path, key: str, value: object) -> None:
    want = FIELD_TYPES[key]
    if want == "string":
        ok = isinstance(value, str)
    elif want == "list of strings":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif want == "table of strings":
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    elif want == "string or list of strings":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    elif want.startswith("boolean"):
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        example = {"list of strings": '["observation.images.top"]', "number": "0.1",
                   "boolean (true/false)": "false", "string or list of strings": '"delta"',
                   "table of strings": '{ wrist = "observation.images.wrist" }'}.get(want, '"..."')
        raise UserError(f"{path}: `{key}` must be a {want}, found {type(value).__name__} {value!r} "
                        f"(write e.g. {key} = {example})")


def resolve(name: str) -> DatasetSpec:
    files = available()
    if name not in files:
        raise UserError(
            f"unknown dataset {name!r}; registered: {', '.join(files) or 'none'}. "
            f"Add {name}.toml to ./registry/ or a directory in $WMCTL_REGISTRY."
        )
    return load_spec(files[name])


def spec_of_source(source: str) -> DatasetSpec | None:
    """The registry entry of the dataset a store source is named after (sources take their dataset's name), or
    None: what training and encoding read a source's roles, weights and kinds from."""
    files = available()
    return load_spec(files[source]) if source in files else None


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """A dataset named on the command line: its source name, root, repo id and registry entry (if any)."""

    name: str
    root: Path
    repo_id: str
    spec: DatasetSpec | None = None


def resolve_source(dataset: str | None, root: Path | None, repo_id: str | None = None) -> SourceRef:
    """`--dataset NAME` (through the registry) or `--root PATH` (a local LeRobot dataset), exactly one."""
    if bool(dataset) == bool(root):
        raise UserError("give exactly one of --dataset NAME (see `wmctl datasets`) or --root PATH")
    if dataset:
        spec = resolve(dataset)
        found = spec.resolved_root()
        if not spec.root and not found.exists():
            from pipeline.lerobot_compat import LEROBOT_VERSION, where_to_look

            raise UserError(f"dataset {dataset} ({spec.repo_id}) is not on this machine: lerobot {LEROBOT_VERSION} "
                            f"keeps it in {where_to_look(spec.repo_id)}. Download it there once (e.g. "
                            f"`LeRobotDataset('{spec.repo_id}')` on a node with network), or set `root` in "
                            f"{spec.path}")
        return SourceRef(spec.name, found, repo_id or spec.repo_id, spec)
    assert root is not None
    name = root.resolve().name
    return SourceRef(name, root, repo_id or f"local/{name}")
