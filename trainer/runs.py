"""The run folder: where training, eval, planning and the decoder write, and a trained run read back once.

```
runs/<YYYYmmdd-HHMMSS>-<kind>/        one training run (`wmctl train`; or the folder given with --out)
  config.json  metrics.jsonl  tensorboard/  PREEMPT (a stop request)  DONE
  LOCK                                the live training process that owns the folder (`RunLock`)
  data.json                           the sources and episodes the run trains on (`trainer.sources`)
  checkpoints/step-XXXXXXXX/          model, EMA, optimizer, state.json (trainer.checkpoint)
  eval/                               `wmctl eval` (eval.json, plots, rollout grids)
  plan/offline_<planner>.json         `wmctl plan offline` (--out: another folder)
  plan/sim_<planner>_<shift>/         `wmctl plan sim` (sim.json with every trial, PNG strips; sim-<time>.json:
                                      an earlier result of another configuration, kept)
runs/<YYYYmmdd-HHMMSS>-decoder/       `wmctl decoder train`
```

A run's checkpoint `state.json` is the one answer to "what was this run trained on": its config, its store
(an absolute path), the encoder identity, the token layout, the normalisation statistics and the episodes
(`RunState`). Read back, every field is checked for its type (a hand-edited file is one error line naming the
file, the key, the type expected and the value found), and nothing read from a file is trusted as a place: the
run folder is the one it was read from, its checkpoints must lie inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.stage import UserError, to_jsonable
from trainer.checkpoint import latest_checkpoint, load_state, resolve_checkpoint
from trainer.config import TrainConfig, config_from_dict, learned_differences
from trainer.data import Stats
from trainer.runlock import LOCK, RunLock  # noqa: F401 - re-exported: the run's owner has a module of its own
from trainer.tokens import TokenShape

RUNS = Path("runs")
DECODER_META = "decoder.json"


def _new_dir(kind: str, base: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-{kind}"
    i = 1
    while path.exists():
        path = base / f"{stamp}-{kind}-{i}"
        i += 1
    return path


def new_run_dir(kind: str, base: Path = RUNS) -> Path:
    """A fresh `runs/<time>-<kind>` folder name for a training run (not created)."""
    return _new_dir(kind, base)


def new_decoder_dir(base: Path = RUNS) -> Path:
    return _new_dir("decoder", base)


def newest_run(base: Path = RUNS) -> Path:
    """The most recently updated run folder that has a complete checkpoint."""
    candidates = [p for p in Path(base).glob("*") if p.is_dir() and latest_checkpoint(p) is not None]
    if not candidates:
        raise UserError(f"no trained run under {base}/ (train one with `wmctl train`, or pass --run/--ckpt)")
    return max(candidates, key=lambda p: latest_checkpoint(p).stat().st_mtime)


def newest_decoder(base: Path = RUNS) -> Path:
    found = sorted((p for p in Path(base).glob("*") if (p / DECODER_META).is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no decoder under {base}/ (train one with `wmctl decoder train`, or pass --decoder)")
    return found[-1]


def resolve_run(run: Path | None, ckpt: Path | None) -> Path:
    """`--run` or `--ckpt` as given, else the newest run under runs/."""
    if run and ckpt:
        raise UserError("give --run or --ckpt, not both")
    return ckpt or run or newest_run()


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint folder (`<run>/checkpoints/step-*`)."""
    return Path(checkpoint).parent.parent


def eval_dir(checkpoint: Path) -> Path:
    return run_dir_of(checkpoint) / "eval"


def plan_dir(checkpoint: Path) -> Path:
    return run_dir_of(checkpoint) / "plan"


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a checkpoint says about its run, read once from its state.json."""

    checkpoint: Path
    config: TrainConfig
    saved_config: dict[str, Any]  # as written (for the resume check, which names fields that differ)
    encoder: dict[str, Any]
    store: Path
    shape: TokenShape
    stats: Stats
    step: int
    lr_scale: float
    data: dict[str, Any] | None = None  # the episodes the run trains on (`trainer.sources.record_episodes`)

    @classmethod
    def read(cls, path: Path) -> RunState:
        """A checkpoint folder, or a run folder (its newest complete checkpoint). Every field is checked for its
        type (`checked_state`); the config's `out` is the run folder it was read from, whatever the file says."""
        ckpt = resolve_checkpoint(path)
        s = checked_state(load_state(ckpt), ckpt / "state.json")
        cfg = dataclasses.replace(config_of(s["config"], ckpt / "state.json"), out=run_dir_of(ckpt))
        shape = _build(TokenShape.from_dict, s["token_shape"], ckpt / "state.json", "token_shape")
        stats = _build(Stats.from_dict, s["stats"], ckpt / "state.json", "stats")
        return cls(ckpt, cfg, s["config"], s["encoder"], Path(s["store"]).resolve(), shape, stats, s["step"],
                   float(s.get("lr_scale", 1.0)), s.get("data"))

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.checkpoint)

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}/{self.checkpoint.name}"


def saved_config(run_dir: Path) -> TrainConfig | None:
    """The config a run folder was trained with (its newest checkpoint's, else the config.json written at its
    start), or None for a folder that holds no run."""
    run_dir = Path(run_dir)
    if latest_checkpoint(run_dir) is not None:
        run = RunState.read(run_dir)
        return dataclasses.replace(run.config, store=run.store)
    if (run_dir / "config.json").is_file():
        return dataclasses.replace(config_of(read_config_json(run_dir), run_dir / "config.json"), out=run_dir)
    return None


def read_config_json(run_dir: Path) -> dict[str, Any]:
    """A run folder's config.json as written (checked for its types: one error line for a hand-edited file)."""
    path = Path(run_dir) / "config.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:120]}); restore it, or remove it "
                        "(the run's checkpoints hold its config too)") from None
    config_of(d, path)
    return d


def finished_as(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether `run_dir` holds a run that finished (DONE) training `cfg`: the same steps and nothing learned
    differently (`learned_differences`; store, output folder and bookkeeping may differ). Studies reuse such a
    run instead of training it again."""
    if not (Path(run_dir) / "DONE").is_file():
        return False
    saved = saved_config(run_dir)
    return saved is not None and saved.steps == cfg.steps and \
        not learned_differences(to_jsonable(saved), to_jsonable(cfg))


# ------------------------------------------------------------------------ what a run's files say, checked
_FIX = "put back the value the run wrote (its other checkpoints' state.json hold it), or start a new --out"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wrong(path: Path, key: str, expected: str, value: Any) -> UserError:
    return UserError(f"{path}: {key} should be {expected}, found {_short(value)}; {_FIX}")


def _expected(annotation: Any) -> str:
    """An annotation as an error line says it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_expected(args[0])})"
        return f"a list of {len(args)} ({', '.join(_expected(a) for a in args)})"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path (a string)",
             type(None): "null"}
    return names.get(annotation, "an object" if dataclasses.is_dataclass(annotation) else str(annotation))


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value is what `to_jsonable` writes for a field of this annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (str, Path):
        return isinstance(value, str)
    if origin is tuple:
        kinds = [args[0]] * len(value) if isinstance(value, list) and len(args) == 2 and args[1] is Ellipsis \
            else list(args)
        return isinstance(value, list) and len(kinds) == len(value) and all(map(_fits, value, kinds))
    if dataclasses.is_dataclass(annotation) or origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # Any


def check_fields(d: Any, cls: type, path: Path, key: str, *, legacy: tuple[str, ...] = ()) -> None:
    """Every key of `d` (a JSON object read from `path`, at `key`) is a field of the dataclass `cls` and holds a value
    of its type (nested dataclasses field by field); `legacy`: keys of older files that are converted on reading."""
    if not isinstance(d, dict):
        raise _wrong(path, key, "an object", d)
    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if k in legacy:
            continue
        if k not in hints:
            raise UserError(f"{path}: {key}.{k} is not a field this wmctl knows (a typo, or a newer wmctl's run); "
                            f"{_FIX}")
        if dataclasses.is_dataclass(hints[k]):
            check_fields(v, hints[k], path, f"{key}.{k}")
        elif not _fits(v, hints[k]):
            raise _wrong(path, f"{key}.{k}", _expected(hints[k]), v)


def config_of(d: Any, path: Path, key: str = "config") -> TrainConfig:
    """A saved config (`to_jsonable(cfg)`, read from `path`) as a TrainConfig; a wrong type or value is one line."""
    check_fields(d, TrainConfig, path, key, legacy=("loss_weight",))
    if "model" not in d:
        raise UserError(f"{path}: {key}.model is missing; {_FIX}")
    if d.get("loss_weight", "ramp") not in ("ramp", "uniform"):
        raise _wrong(path, f"{key}.loss_weight", '"ramp" or "uniform"', d["loss_weight"])
    try:
        return config_from_dict(d)
    except UserError as e:
        raise UserError(f"{path}: {key}: {e}") from None


_STATE_KEYS = {"config": dict, "encoder": dict, "store": str, "token_shape": dict, "stats": dict, "step": int}


def checked_state(s: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, every field checked for its type (the config and token shape field by field, the
    statistics as lists of numbers)."""
    if not isinstance(s, dict):
        raise _wrong(path, "the file", "an object", s)
    for key, kind in _STATE_KEYS.items():
        if key not in s:
            raise UserError(f"{path}: {key} is missing; {_FIX}")
        if not _fits(s[key], kind):
            raise _wrong(path, key, _expected(kind), s[key])
    if "lr_scale" in s and not _fits(s["lr_scale"], float):
        raise _wrong(path, "lr_scale", "a number", s["lr_scale"])
    check_fields(s["token_shape"], TokenShape, path, "token_shape")
    names = {f.name for f in dataclasses.fields(Stats)}
    for key, value in s["stats"].items():
        if key not in names:
            raise UserError(f"{path}: stats.{key} is not a statistic this wmctl knows; {_FIX}")
        if not _numbers(value):
            raise _wrong(path, f"stats.{key}", "a list of numbers", value)
    return s


def _numbers(value: Any) -> bool:
    if isinstance(value, list):
        return all(_numbers(v) for v in value)
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _build(make: Any, d: dict[str, Any], path: Path, key: str) -> Any:
    """`make(d)`, its complaints about a value (types are checked before) as one line naming the file."""
    try:
        return make(d)
    except UserError as e:
        reason = str(e)
    except (TypeError, ValueError, KeyError) as e:
        reason = f"{type(e).__name__}: {e}"
    raise UserError(f"{path}: {key}: {reason}; {_FIX}")


# ------------------------------------------------------------------------------------ output folders
def check_writable(folder: Path, what: str, fix: str) -> Path:
    """`folder` can be written (it, or the nearest folder above it that exists, is a folder this process may write
    in): checked before a command computes for minutes and then fails writing. Returns `folder`."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {folder}: {probe} is not a folder; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == folder.absolute() else f" ({probe}, where it would be made, is not writable)"
        raise UserError(f"{what} {folder} is not writable{where}: nothing was computed; {fix}")
    return folder
