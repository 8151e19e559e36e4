"""Where `wmctl eval` writes and what: eval.json (`EvalResult.to_json`), the plots, the rollout grids of a decoder,
and the figures in the run's tracker next to its training curves (`trainer.tracking`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featurestore.reader import TokenReader
from pipeline.names import safe_component
from pipeline.stage import atomic_write_json
from trainer.api import LoadedWorldModel
from trainer.checkpoint import resolve_checkpoint
from trainer.eval.config import EvalConfig
from trainer.eval.result import EvalResult
from trainer.runs import check_writable, eval_dir, run_dir_of
from trainer.tracking import open_tracker


def output_folders(cfg: EvalConfig) -> tuple[Path, Path]:
    """Where eval writes (eval.json, plots, rollout grids) and where its tracker writes (the run's tracker next to
    its training curves; with --out, the --out folder: nothing is then written into the run). Both checked writable
    before anything is computed."""
    ckpt = resolve_checkpoint(cfg.ckpt)
    out = cfg.out or eval_dir(ckpt)
    track = out if cfg.out is not None else run_dir_of(ckpt)
    fix = "pass --out DIR (a folder you can write; nothing is then written into the run)"
    check_writable(out, "the eval output folder", fix)
    if cfg.tracker != "none":
        check_writable(track, f"the folder of the eval's --tracker {cfg.tracker}", f"{fix}, or --tracker none")
    return out, track


def write_result(cfg: EvalConfig, wm: LoadedWorldModel, reader: TokenReader, result: EvalResult, out: Path,
                 track: Path, horizon: int) -> EvalResult:
    """eval.json (first as soon as the scores exist, again with the figures' paths), plots, rollout grids into
    `out`; the figures into the tracker at `track`. Returns the result with its figures and `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", result.to_json())
    if cfg.plots:
        from trainer.eval.plots import plot_eval

        result = dataclasses.replace(result, plots=plot_eval(result, out))
    if cfg.decoder is not None:
        result = dataclasses.replace(result, rollouts=_rollout_grids(cfg, reader, out, horizon))
    atomic_write_json(out / "eval.json", result.to_json())
    _track(cfg, wm, result, track)
    return dataclasses.replace(result, out=str(out))


def _track(cfg: EvalConfig, wm: LoadedWorldModel, result: EvalResult, folder: Path) -> None:
    """The eval figures in the tracker at `folder` (the run's, next to its training curves, unless --out), at the
    training step of the checkpoint evaluated: per condition, metric, model and horizon one scalar
    (`eval/actions/mse/model/h5`), so evals of successive checkpoints form curves over training (and W&B, whose
    steps only go forward, keeps them: `trainer.tracking`); the plots and rollout grids as images at that step.
    W&B: the run's own project, entity and tags."""
    run = wm.cfg
    tracker = open_tracker(cfg.tracker, folder, name=run_dir_of(wm.checkpoint).name, project=run.wandb_project,
                           entity=run.wandb_entity, tags=run.wandb_tags)
    try:
        values = {}
        for cond, entry in result.conditions.items():
            for name, errs in entry.items():
                label = "model" if name == wm.name else name.split("/")[0] + ("+noise" if name.endswith("+noise")
                                                                               else "")
                for metric in ("mse", "mse_single", "energy", "mse_moving"):
                    values.update({f"eval/{cond}/{metric}/{label}/h{int(h)}": v for h, v in errs[metric].items()})
        tracker.scalars(values, wm.step)
        for png in [*(result.plots or []), *(result.rollouts or [])]:
            tracker.image(f"eval/{Path(png).stem}", Path(png), wm.step)
    finally:
        tracker.close()


def _rollout_grids(cfg: EvalConfig, reader: TokenReader, out: Path, horizon: int) -> list[str]:
    """PNG grids (truth | decoded truth | with actions | null action) of the first `cfg.rollouts` episodes of
    the evaluated split in the decoder's source, labelled episodes first."""
    from featurestore.decoder import load_decoder
    from trainer.visualize import VisualizeConfig, run_visualize

    _, meta = load_decoder(cfg.decoder)
    eps = reader.episodes
    eps = eps[(eps.source == meta["source"]) & (eps.split == cfg.split) & (eps.view == 0)]
    eps = eps.sort_values(["has_actions", "episode_index"], ascending=[False, True])
    paths = []
    for e in eps.episode_index.iloc[: cfg.rollouts]:
        source = safe_component(meta["source"], f"decoder {cfg.decoder}: its source", "fix its decoder.json")
        path = out / f"rollout_{source}_ep{int(e)}.png"
        run_visualize(VisualizeConfig(run=cfg.ckpt, out=path, store=reader.path, decoder=cfg.decoder, episode=int(e),
                                      horizon=horizon, context=cfg.context, k=cfg.k, seed=cfg.seed))
        paths.append(str(path))
    return paths
