"""Share a trained world model: a self-contained folder that loads without its run, its store or this machine.

```
<out>/
  config.json        the format, the train config (no paths), token shape, action space, training step, weights
  model.safetensors  the weights (the EMA by default)
  encoder.json       the encoder's identity: what a token store must be made with (weights hash, architecture,
                     preprocessing; its name, never its path)
  stats.json         the normalisation statistics (tokens, actions, state)
  README.md          a model card: what it is, how to load it, its eval table (<run>/eval/eval.json when present)
  proposal/          the run's amortized proposal when it has one (<run>/proposal/: proposal.json, its paths by name
                     only, and proposal.safetensors): `--planner cem+proposal|proposal` plan with it from the export
```

`export_run` writes it (to a temporary folder, renamed when complete); `push_to_hub` uploads it to a Hugging Face
model repo; `LoadedWorldModel.load` (`trainer.api`) takes it, or a Hub id found in the local Hugging Face cache,
wherever it takes a run, with the token store given separately where a command needs one. Nothing written holds
an absolute path: the store and output folders of the run are kept by name only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.stage import UserError, atomic_write_json, owner_tag, to_jsonable
from trainer.checkpoint import load_weights, resolve_checkpoint
from trainer.config import TrainConfig
from trainer.data import Stats, action_space
from trainer.runs import RunState, check_fields, config_of
from trainer.tokens import TokenShape

log = logging.getLogger(__name__)

FORMAT = "wmctl-world-model"
FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "encoder.json", "stats.json", "README.md")
PROPOSAL_FILES = ("proposal/proposal.json", "proposal/proposal.safetensors")  # where the run has a proposal


# ---------------------------------------------------------------------------------------------- writing
def export_run(run: Path, out: Path, *, weights: str = "ema", force: bool = False) -> Path:
    """Write the model of `run` (a run folder: its best or newest checkpoint; or a checkpoint folder) to `out`.
    An existing non-empty `out` is refused unless it is an earlier export and `force`. Returns `out`."""
    if weights not in ("ema", "model"):
        raise UserError(f"--weights {weights!r}: choose ema (the default) or model")
    state = RunState.read(run)
    out = Path(out)
    _check_out(out, force)
    tmp = out.parent / f".{out.name}.{owner_tag()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in load_weights(state.checkpoint, weights).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "encoder.json", portable_encoder(state.encoder))
        atomic_write_json(tmp / "stats.json", state.stats.to_dict())
        proposal = _copy_proposal(state, tmp)
        atomic_write_json(tmp / "config.json", {**model_config(state, weights), "proposal": proposal})
        (tmp / "README.md").write_text(model_card(state, weights, out.name, _eval_of(state), proposal))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s weights, step %d) to %s", state.name, weights, state.step, out)
    return out


def _copy_proposal(state: RunState, tmp: Path) -> dict[str, Any] | None:
    """The run's proposal (<run>/proposal/) into the export: its weights as they are, its record with every path
    reduced to a name (the weights' sha256 it names still holds); None where the run has none. A torn one is
    refused (load_proposal's error names the fix); a training's progress (partial.*) is not copied."""
    from trainer.proposal import PROPOSAL_DIR, RECORD, WEIGHTS, load_proposal, proposal_dir, read_record

    src = proposal_dir(state.run_dir)
    record = read_record(src)
    if record is None:
        return None
    load_proposal(src)  # the pair is whole (the weights are the ones the record names) and loads
    dst = tmp / PROPOSAL_DIR
    dst.mkdir()
    shutil.copyfile(src / WEIGHTS, dst / WEIGHTS)
    atomic_write_json(dst / RECORD, _portable(record))
    return {"files": list(PROPOSAL_FILES), "steps": record.get("steps"), "horizon": record["config"].get("horizon"),
            "action_error": record.get("action_error")}


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file: choose a folder for the exported model")
    if any(out.iterdir()) and not (force and is_export(out)):
        what = "an earlier export: pass --force to replace it" if is_export(out) else "not empty: choose a new folder"
        raise UserError(f"--out {out} is {what}")


def _portable(value: Any) -> Any:
    """`value` with every absolute path in it reduced to its last component (a run's store, output folder)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or Path(value).is_absolute()):
        return Path(value).name
    return value


def model_config(state: RunState, weights: str) -> dict[str, Any]:
    """config.json: the format, the train config (paths by name only), token shape, action space, provenance."""
    cfg = to_jsonable(dataclasses.replace(state.config, out=None, init_from=None))
    space = action_space(state.config, state.stats)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wmctl_version": _version(),
        "kind": state.config.model.kind, "step": state.step, "weights": weights,
        "config": _portable(cfg),
        "token_shape": dataclasses.asdict(state.shape),
        "action_space": {"mode": space.mode, "frameskip": space.frameskip, "kinds": list(space.kinds),
                         "step_dim": space.step_dim, "frame_dim": space.frame_dim,
                         "source_frameskip": [list(x) for x in state.config.source_frameskip],
                         "statistics": "stats.json (action_mean, action_std)"},
        "trained_from": {"run": state.run_dir.name, "checkpoint": state.checkpoint.name,
                         "store": Path(state.store).name,
                         "init_from": Path(state.config.init_from).name if state.config.init_from else None},
    }


def portable_encoder(identity: dict[str, Any]) -> dict[str, Any]:
    """The encoder identity as a store compares it (`featurestore.encoders.identity_key`: unchanged) plus its
    labels (model id, description) with any path reduced to a name."""
    from featurestore.encoders import IDENTITY_LABELS, identity_key

    labels = {k: _portable(identity[k]) for k in IDENTITY_LABELS if k in identity}
    if isinstance(labels.get("model_id"), str) and labels["model_id"] != identity.get("model_id"):
        labels["model_id"] = f"local:{labels['model_id']}"
    return {**identity_key(identity), **labels}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wmctl")
    except PackageNotFoundError:
        return "unknown"


def _eval_of(state: RunState) -> dict[str, Any] | None:
    path = state.run_dir / "eval" / "eval.json"
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s): the model card has no eval table", path, type(e).__name__)
        return None
    return result if isinstance(result, dict) and isinstance(result.get("conditions"), dict) else None


def model_card(state: RunState, weights: str, name: str, result: dict[str, Any] | None,
               proposal: dict[str, Any] | None = None) -> str:
    """README.md: Hugging Face metadata, what the model is and takes, how to load it, its eval table."""
    cfg, shape, enc = state.config, state.shape, state.encoder
    m = cfg.model
    rate = f"{cfg.fps:g} fps" if cfg.fps else f"frameskip {cfg.frameskip}"
    lines = [
        "---", "library_name: wmctl", "tags:", "- world-model", "- robotics", "- latent-dynamics", "---", "",
        f"# {name}", "",
        f"A latent world model of robot manipulation trained with wmctl: the {m.kind.replace('_', '-')} dynamics "
        f"over frozen encoder tokens, predicting the next frames' tokens from past frames and actions.", "",
        "| | |", "|---|---|",
        f"| model | {m.kind}, dim {m.dim}, depth {m.depth}, heads {m.heads}, {cfg.max_context()}-frame window |",
        f"| weights | {weights.upper() if weights == 'ema' else weights}, step {state.step} of {cfg.steps} |",
        f"| tokens | {shape.cameras} camera(s) x {shape.grid[0]}x{shape.grid[1]} x {shape.enc_dim}, {rate} |",
        f"| actions | {shape.action_dim} per model frame, {cfg.action_mode} |",
        f"| state | {shape.state_dim or 'none'} (proprioception {'on' if cfg.proprio else 'off'}) |",
        f"| encoder | {portable_encoder(enc).get('model_id', '?')}, weights sha256 "
        f"{str(enc.get('weights_sha256', '?'))[:16]}... (encoder.json) |",
        f"| trained on | {_sources(state)} |",
        *([f"| proposal | proposal/: the amortized proposal ({proposal['steps']} steps, horizon {proposal['horizon']}) "
           "for `--planner cem+proposal` and `--planner proposal` |"] if proposal else []), "",
        "## Use", "",
        "It predicts tokens of the encoder in `encoder.json`: give it a token store made with that encoder.", "",
        "```python", "from trainer.api import LoadedWorldModel", "",
        f'wm = LoadedWorldModel.load("{name}", store="tokens.zarr")  # this folder, or its Hub id (in the HF cache)',
        "```", "",
    ]
    return "\n".join(lines + eval_table(result, state)) + "\n"


def _sources(state: RunState) -> str:
    """The sources the run trained on, with their frames (its recorded episodes), by name."""
    recorded = (state.data or {}).get("sources") or {}
    if recorded:
        return ", ".join(f"{src} ({rec.get('frames', '?'):,} frames)" if isinstance(rec.get("frames"), int) else src
                         for src, rec in recorded.items())
    return ", ".join(state.config.sources) or "every source of its token store"


def eval_table(result: dict[str, Any] | None, state: RunState) -> list[str]:
    """The model card's eval section: per condition and horizon the MSE of the sample mean (normalised tokens,
    lower is better) of the model, copy-last (the frame before, unchanged) and each baseline."""
    if result is None:
        return ["## Evaluation", "", "Not evaluated before export (`wmctl eval --run RUN`, then export again)."]
    hs = [str(h) for h in result.get("horizons", [])]
    main = result.get("model", "")
    evaluated = main.split("/")[-1]
    note = "" if evaluated == state.checkpoint.name else \
        f" Note: the eval is of {evaluated}, the exported weights of {state.checkpoint.name}."
    out = ["## Evaluation", "",
           f"`wmctl eval`, {result.get('split', '?')} windows, context {result.get('context', '?')} frames, "
           f"K={result.get('k', '?')}: MSE of the sample mean per horizon (frames ahead), normalised tokens, lower "
           f"is better; copy-last repeats the last context frame.{note}", ""]
    for cond, entry in result["conditions"].items():
        names = [n for n in entry if n not in (main, "copy_last")]
        cols = [(main, "model"), ("copy_last", "copy-last"), *((n, n.split("/")[0] + ("+noise" if n.endswith(
            "+noise") else "")) for n in names)]
        cols = [(n, label) for n, label in cols if n in entry]
        out += [f"### {cond.replace('_', ' ')}", "", "| horizon | " + " | ".join(label for _, label in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for h in hs:
            cells = [_fmt(entry[n].get("mse", {}).get(h)) for n, _ in cols]
            out.append(f"| {h} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "-"


# ---------------------------------------------------------------------------------------------- reading
def is_export(path: Path) -> bool:
    """Whether `path` is a folder `export_run` wrote (its config.json names the format)."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def locate(name: str | Path) -> Path:
    """A run, checkpoint or export folder as given; else a Hub id (`owner/name`) found in the local Hugging Face
    cache (never downloaded here: `hf download owner/name` where there is network)."""
    path = Path(name).expanduser()
    text = str(name)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")) or "" in text.split("/"):
        return path
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub's error types vary between versions)
        raise UserError(f"{text}: no such folder, and no Hub model of that id in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}); download it once with `hf download {text}` where there is "
                        "network, or pass the exported folder") from None


def checkpoint_of(path: Path) -> Path:
    """What a command's --run names as its checkpoint: a run's (`resolve_checkpoint`), or for an export the name
    `<export>/checkpoints/step-N` (its run folder, for outputs, is then the export folder)."""
    path = locate(path)
    return ExportedModel.read(path).checkpoint if is_export(path) else resolve_checkpoint(path)


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """An exported model as read back, every file checked (one error line naming the file and the fix)."""

    folder: Path
    config: TrainConfig
    shape: TokenShape
    stats: Stats
    encoder: dict[str, Any]
    step: int
    weights: str

    @classmethod
    def read(cls, folder: Path) -> ExportedModel:
        folder = Path(folder)
        d = _json(folder / "config.json")
        if d.get("format") != FORMAT or not isinstance(d.get("format_version"), int):
            raise UserError(f"{folder / 'config.json'}: not a wmctl model export (no format {FORMAT!r}); export one "
                            "with `wmctl export RUN --out DIR`")
        if d["format_version"] > FORMAT_VERSION:
            raise UserError(f"{folder}: exported by a newer wmctl (format {d['format_version']}, this one reads "
                            f"{FORMAT_VERSION}): upgrade wmctl")
        path = folder / "config.json"
        cfg = config_of(d.get("config"), path)
        check_fields(d.get("token_shape"), TokenShape, path, "token_shape")
        shape = _made(TokenShape.from_dict, d["token_shape"], path)
        if not isinstance(d.get("step"), int) or d.get("weights") not in ("ema", "model"):
            raise UserError(f"{path}: step should be an integer and weights ema or model; export the run again")
        stats = _made(Stats.from_dict, _json(folder / "stats.json"), folder / "stats.json")
        encoder = _json(folder / "encoder.json")
        if "weights_sha256" not in encoder:
            raise UserError(f"{folder / 'encoder.json'}: no encoder identity (weights_sha256); export the run again")
        return cls(folder, cfg, shape, stats, encoder, d["step"], d["weights"])

    @property
    def checkpoint(self) -> Path:
        """A checkpoint-like name, `<export>/checkpoints/step-N`: the export folder is its run folder (outputs of
        eval or planning land there unless given --out); the weights lie at the export's root."""
        return self.folder / "checkpoints" / f"step-{self.step:08d}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.folder / "model.safetensors"
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a file that is not one
            raise UserError(f"{path} cannot be read ({type(e).__name__}): the export is damaged; export the run "
                            "again (or download it again)") from None


def _json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}); export the run again (or download it "
                        "again)") from None
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a JSON object; export the run again")
    return d


def _made(make: Any, d: Any, path: Path) -> Any:
    try:
        return make(d)
    except (TypeError, ValueError, KeyError, UserError) as e:
        raise UserError(f"{path}: {type(e).__name__}: {e}; export the run again") from None


# ---------------------------------------------------------------------------------------------- the Hub
def upload_files(folder: Path) -> list[str]:
    """The files `push_to_hub` uploads: the export's own, nothing else the folder may hold."""
    folder = Path(folder)
    if not is_export(folder):
        raise UserError(f"{folder} is not a wmctl model export: export one with `wmctl export RUN --out DIR`")
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: export the run again")
    proposal = [f for f in PROPOSAL_FILES if (folder / f).is_file()]
    if proposal and len(proposal) != len(PROPOSAL_FILES):
        raise UserError(f"{folder} holds {proposal[0]} alone: export the run again")
    return list(FILES) + proposal


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload an export to the Hugging Face model repo `repo` (made if missing); returns its URL. Refused offline
    (HF_HUB_OFFLINE), naming the fix; the token is huggingface_hub's (`hf auth login` or HF_TOKEN)."""
    files = upload_files(folder)
    again = f"`hf upload {repo} {folder}` (or `wmctl export RUN --out {folder} --force --push-to-hub {repo}`)"
    if hub_offline():
        raise UserError(f"cannot push {folder} to the Hub repo {repo}: HF_HUB_OFFLINE is set (no network); on a "
                        f"machine with network, unset it, log in (`hf auth login` or HF_TOKEN), then {again}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), allow_patterns=files,
                          commit_message=f"wmctl export of {folder.name}")
    except Exception as e:  # noqa: BLE001 - network, auth and Hub errors alike: one line and the fix
        reason = str(e).splitlines()[0][:160] if str(e).strip() else ""
        raise UserError(f"pushing {folder} to {repo} failed ({type(e).__name__}: {reason}); check the network and "
                        f"your token (`hf auth login`), then {again}") from None
    return str(url)
