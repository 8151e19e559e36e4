"""How the training sources of a store map into one model: their rate (`derive_rate`: each source's frameskip
at the model's fps, and how a frame's actions add up), their share of the mix (`derive_mix`; both taken together
when a run starts by `trainer.derive.derive`), their cameras' slots and their robots (`token_shape`: camera
slots, embodiments), and at eval/plan time one source's frames as the model takes them (`source_layout`). Resolved
from the store and the registry when a run starts and recorded in it (config.json, the checkpoint's token shape),
so eval and planning read them back.

A run also records the episodes it trains on (`record_episodes`: per source, split and view the episode
indices, and their frames; in data.json and every checkpoint's state), and a resumed run reads exactly those
(`pin_episodes`): sources or episodes appended to the store since are ignored (said in the log), a source that is
gone or changed is refused. Its mix, val set and camera layout stay those it started with.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.reader import TokenReader
from pipeline.registry import spec_of_source
from pipeline.stage import UserError
from trainer.config import TrainConfig
from trainer.data import select_episodes
from trainer.tokens import FULL_FRAME, FrameLayout, TokenShape

log = logging.getLogger(__name__)


def _registered_slots(source: str) -> tuple[dict[str, str], str]:
    """A source's camera key -> slot map from the registry entry of the same name ({} without one), and its file."""
    spec = spec_of_source(source)
    return ({key: slot for slot, key in spec.camera_slots}, spec.path) if spec else ({}, "")


def camera_slots(reader: TokenReader, sources: list[str]) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """The model's camera slots and each source's (the slot of each of its store cameras, in store order), from
    the registry's `camera_slots` of each source's dataset. Without any, cameras go by position (every source
    must then have as many); refused: some sources with slots and some without, a store camera without a slot."""
    keys = {s: [str(k) for k in reader.source_attrs(s)["cameras"]] for s in sources}
    declared = {s: _registered_slots(s) for s in sources}
    with_slots = [s for s in sources if declared[s][0]]
    if not with_slots:
        if len({len(k) for k in keys.values()}) > 1:
            said = "; ".join(f"{s}: {k}" for s, k in keys.items())
            raise UserError(f"training sources have different cameras ({said}); name each camera's role in its "
                            "dataset's registry file, e.g. camera_slots = { exterior_1 = \"observation.images."
                            "front\", wrist = \"observation.images.wrist\" } (docs/registry.md#camera-slots), or "
                            "train on some sources with --sources")
        return (), {}
    without = [s for s in sources if s not in with_slots]
    if without:
        raise UserError(f"sources {without} have no camera_slots in a registry file while {with_slots} do; name the "
                        f"camera roles of every training source (registry `camera_slots`) or train apart (--sources)")
    order = sorted(sources, key=lambda s: (-len(keys[s]), s))
    names: list[str] = []
    for s in order:
        slot_of, path = declared[s]
        for k in keys[s]:
            if k not in slot_of:
                raise UserError(f"source {s}: its store camera {k!r} has no slot in camera_slots of {path} (it names "
                                f"{sorted(slot_of)}); add e.g. {k.rsplit('.', 1)[-1]} = \"{k}\"")
            if slot_of[k] not in names:
                names.append(slot_of[k])
    per = {s: tuple(names.index(declared[s][0][k]) for k in keys[s]) for s in sources}
    log.info("camera slots %s: %s", names, "; ".join(f"{s} fills {[names[i] for i in per[s]]}" for s in sources))
    return tuple(names), per


def source_layout(shape: TokenShape, reader: TokenReader, source: str) -> FrameLayout:
    """A source's frames as the model takes them (eval, planning): its cameras' slots (`source_cameras`) and its
    robot. A source the model was not trained on is matched by its registry entry (`embodiment`, else its
    state width); a robot the model does not know is refused."""
    cams = source_cameras(shape, reader, source)
    if len(shape.embodiments) < 2:
        return cams
    trained = dict(shape.source_embodiment)
    if source in trained:
        return dataclasses.replace(cams, embodiment=trained[source])
    width = int(reader.source_attrs(source)["state_dim"])
    name = _embodiment_name(source, width)
    names = [n for n, _ in shape.embodiments]
    if name not in names or shape.embodiments[names.index(name)][1] != width:
        raise UserError(f"source {source}: robot {name!r} ({width}-D state) is not one the model was trained on "
                        f"({', '.join(f'{n} ({w}-D)' for n, w in shape.embodiments)}); set `embodiment` in its "
                        "registry entry to one of them, or train a model that includes it")
    return dataclasses.replace(cams, embodiment=names.index(name))


def source_cameras(shape: TokenShape, reader: TokenReader, source: str) -> FrameLayout:
    """The model's slots a source's store cameras fill (eval, planning: the source's own cameras only). A source the
    model was not trained on gets its slots from its registry entry; one naming a slot the model lacks is refused."""
    trained = dict(shape.source_slots)
    if source in trained:
        return FrameLayout(trained[source])
    keys = [str(k) for k in reader.source_attrs(source)["cameras"]]
    if not shape.slots:
        if len(keys) != shape.cameras:
            raise UserError(f"source {source} has {len(keys)} cameras {keys}, the model was trained on "
                            f"{shape.cameras} (cameras by position); use a source with its cameras")
        return FULL_FRAME
    slot_of, path = _registered_slots(source)
    names = [slot_of.get(k) for k in keys]
    unknown = sorted({str(n) for n in names if n not in shape.slots})
    if unknown:
        raise UserError(f"source {source}: unknown camera slot(s) {unknown} (its cameras {keys}, registry "
                        f"{path or 'none'}); the model has slots {list(shape.slots)}: set camera_slots in its "
                        "registry file to those roles")
    return FrameLayout(tuple(shape.slots.index(n) for n in names))


def token_shape(reader: TokenReader, cfg: TrainConfig) -> TokenShape:
    """Camera slots, grid, width and action width, checked to agree across the training sources."""
    enc = reader.encoder
    sources = sorted(set(select_episodes(reader, cfg, "train").source))
    if not sources:
        raise UserError(f"{reader.path} has no committed train-split episodes for sources {cfg.sources or 'all'}")
    slots, per_source = camera_slots(reader, sources)
    n_cams = len(slots) or len(reader.source_attrs(sources[0])["cameras"])
    adims = {reader.source_attrs(s)["action_dim"] for s in sources if reader.source_attrs(s)["has_actions"]}
    if len(adims) > 1:
        raise UserError(f"labelled sources have different action widths {sorted(adims)}; train them apart")
    a = adims.pop() if adims else 0
    s, bodies, body_of = 0, (), {}
    if cfg.proprio:
        bodies, body_of = embodiments(reader, sources)
        s = max(w for _, w in bodies)
        if len(bodies) == 1:  # one robot: no embodiment table (and the layout of runs from before it)
            bodies, body_of = (), {}
    per_frame = a * (1 if cfg.action_kinds else cfg.frameskip)  # added up by kind, or the steps concatenated
    return TokenShape(cameras=n_cams, grid=tuple(enc["grid"]), enc_dim=int(enc["dim"]), action_dim=per_frame,
                      state_dim=s, slots=slots, source_slots=tuple(sorted(per_source.items())), embodiments=bodies,
                      source_embodiment=tuple(sorted(body_of.items())))


def _embodiment_name(source: str, width: int) -> str:
    spec = spec_of_source(source)
    return (spec.embodiment if spec else "") or f"{width}-D state"


def embodiments(reader: TokenReader, sources: list[str]) -> tuple[tuple[tuple[str, int], ...], dict[str, int]]:
    """The robots of the training sources, for proprioception: (name, state width) each (the registry's
    `embodiment`, default one per state width) and each source's index. Refused: a source without a state, one
    embodiment name with two widths."""
    widths = {src: int(reader.source_attrs(src)["state_dim"]) for src in sources}
    none = sorted(src for src, w in widths.items() if not w)
    if none:
        raise UserError(f"proprio needs a state in every training source; {none} have none: train with --set "
                        "proprio=false or on the others with --sources")
    names = {src: _embodiment_name(src, w) for src, w in widths.items()}
    table: dict[str, int] = {}
    for src in sorted(sources, key=lambda x: (-widths[x], x)):  # the widest robot first
        if table.setdefault(names[src], widths[src]) != widths[src]:
            raise UserError(f"embodiment {names[src]!r}: source {src} has a {widths[src]}-D state, another source of "
                            f"it {table[names[src]]}-D; give them different `embodiment` names in the registry")
    order = list(table)
    if len(order) > 1:
        log.info("embodiments: %s", "; ".join(f"{n} ({table[n]}-D state): "
                                              f"{sorted(s for s in sources if names[s] == n)}" for n in order))
    return tuple((n, table[n]) for n in order), {src: order.index(names[src]) for src in sources}


def derive_rate(cfg: TrainConfig, reader: TokenReader
                ) -> tuple[int, tuple[tuple[str, int], ...], tuple[str, ...]]:
    """`fps` (the model's rate) -> each training source's frameskip, from the rate it is stored at (its dataset's
    fps, or the lower one it was encoded at with `wmctl encode --fps`): a model frame is 1/fps seconds in every
    source. Sources at different rates get their own frameskip (`source_frameskip`), the labelled ones must share
    one (the action space's: `frameskip`). Refuses a rate a source cannot serve (naming the nearest it can).
    Returns (frameskip, source_frameskip, action_kinds): the config's own without `fps`."""
    if cfg.fps is None:
        return cfg.frameskip, cfg.source_frameskip, cfg.action_kinds
    from pipeline.rates import stride_for

    eps = select_episodes(reader, cfg, "train")
    labelled = set(str(x) for x in eps[eps.has_actions].source.unique())
    need = {}
    for src in sorted(str(s) for s in eps.source.unique()):
        attrs = reader.source_attrs(src)
        stored = float(attrs.get("stored_fps", attrs["fps"]))
        need[src] = (stride_for(stored, cfg.fps, src, what="--fps"), stored)
    said = ", ".join(f"{s} (stored at {f:g} fps: every {k})" for s, (k, f) in need.items())
    acting = {need[s][0] for s in labelled}
    if len(acting) > 1:
        raise UserError(f"--fps {cfg.fps:g}: the labelled sources are stored at different rates ({said}); their "
                        f"actions share one action space, so they need one frameskip: encode them at a common rate "
                        f"(`wmctl encode --fps {cfg.fps:g}`) or train on some with --sources")
    k = acting.pop() if acting else next(iter(need.values()))[0] if need else cfg.frameskip
    per_source = tuple((s, n) for s, (n, _) in need.items()) if len({n for n, _ in need.values()}) > 1 else ()
    if k != cfg.frameskip or per_source:
        log.info("--fps %g: frameskip %s: %s", cfg.fps, k if not per_source else "per source", said)
    return k, per_source, _frame_action_kinds(reader, cfg, k)


def _frame_action_kinds(reader: TokenReader, cfg: TrainConfig, frameskip: int) -> tuple[str, ...]:
    """How the labelled sources' actions add up over a model frame of `frameskip` stored frames (one action per
    model frame): each source's registry `action_kind`, else the kinds it was stored with (`encode --fps`).
    None needed at frameskip 1; a labelled source without, or labelled sources that disagree, are refused."""
    from pipeline.rates import action_kinds

    if frameskip == 1:
        return ()
    eps = select_episodes(reader, cfg, "train")
    found = {}
    for src in sorted(str(x) for x in eps[eps.has_actions].source.unique()):
        attrs = reader.source_attrs(src)
        spec = spec_of_source(src)
        kind = (spec.action_kind if spec else "") or tuple(attrs.get("action_kind") or ())
        found[src] = action_kinds(kind, int(attrs["action_dim"]), src)
    if len(set(found.values())) > 1:
        raise UserError(f"--fps {cfg.fps:g}: the labelled sources add up their actions differently "
                        f"({'; '.join(f'{s}: {list(k)}' for s, k in found.items())}); one model takes one action "
                        "space: train them apart (--sources)")
    kinds = next(iter(found.values()), ())
    if kinds:
        log.info("--fps %g: one action per model frame, its %d steps added up by kind %s", cfg.fps, frameskip,
                 list(kinds))
    return kinds


def derive_mix(cfg: TrainConfig, reader: TokenReader) -> tuple[tuple[str, float], ...]:
    """A weight for every training source of `cfg` (at its rate): given ones, else the registry's `mix_weight` of the
    dataset of the same name, else 1 (what a run records; the given ones as they are under a `labelled_fraction`
    override, which decides the mix instead)."""
    if cfg.labelled_fraction is not None:
        return cfg.mix_weights
    given = dict(cfg.mix_weights)
    stored = set(reader.store.sources())
    unknown = sorted(set(given) - stored)
    if unknown:
        raise UserError(f"mix_weights name {unknown}, which {reader.path} does not hold; its sources: "
                        f"{', '.join(sorted(stored))}")
    out, said = [], []
    for src in sorted(str(s) for s in select_episodes(reader, cfg, "train").source.unique()):
        spec = spec_of_source(src)
        if src in given:
            w, origin = given[src], "mix_weights"
        elif spec is not None:
            w, origin = spec.mix_weight, f"registry {spec.path}"
        else:
            w, origin = 1.0, "default"
        out.append((src, float(w)))
        said.append(f"{src} {w:g} ({origin})")
    if out and not sum(w for _, w in out):
        raise UserError(f"every training source has mix weight 0 ({'; '.join(said)}): give one a weight > 0")
    log.info("training mix: %s", "; ".join(said))
    return tuple(out)


# ------------------------------------------------------------------------------ the episodes of a run
DATA_FILE = "data.json"


def _ranges(indices: list[int]) -> list[list[int]]:
    """Sorted integers as inclusive runs [[first, last], ...] (a DROID-sized split stays a few kB)."""
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _expand(ranges: list[list[int]]) -> list[int]:
    return [i for a, b in ranges for i in range(a, b + 1)]


def _run_rows(reader: TokenReader, cfg: TrainConfig):
    eps = reader.episodes
    return eps[eps.source.isin(cfg.sources)] if cfg.sources else eps


def record_episodes(reader: TokenReader, cfg: TrainConfig) -> dict[str, Any]:
    """What a run trains on, recorded when it starts: per source (`cfg.sources`, else every source of the store)
    the indices of its episodes per split and view, and the frames they hold."""
    sources: dict[str, Any] = {}
    for src, rows in _run_rows(reader, cfg).groupby("source", sort=True):
        splits: dict[str, dict[str, list[list[int]]]] = {}
        for (split, view), g in rows.groupby(["split", "view"], sort=True):
            splits.setdefault(str(split), {})[str(int(view))] = _ranges(sorted(int(i) for i in g.episode_index))
        sources[str(src)] = {"episodes": splits, "frames": int(rows.length.sum())}
    return {"sources": sources}


def check_record(record: Any, where: Path) -> dict[str, Any]:
    """A recorded selection as read back (from data.json or a checkpoint's state), its types checked."""
    def bad(key: str, expected: str, value: Any) -> UserError:
        return UserError(f"{where}: {key} should be {expected}, found {str(value)[:60]}; put back what the run wrote "
                         "(its checkpoints' state.json hold it under `data`), or start a new --out")

    sources = record.get("sources") if isinstance(record, dict) else None
    if not isinstance(sources, dict):
        raise bad("sources", "an object", sources)
    for src, rec in sources.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("episodes"), dict):
            raise bad(f"sources.{src}", "an object with episodes and frames", rec)
        if not isinstance(rec.get("frames"), int) or isinstance(rec.get("frames"), bool):
            raise bad(f"sources.{src}.frames", "an integer", rec.get("frames"))
        for split, views in rec["episodes"].items():
            ok = isinstance(views, dict) and all(
                isinstance(r, list) and all(isinstance(x, list) and len(x) == 2 and all(
                    isinstance(i, int) and not isinstance(i, bool) for i in x) for x in r) for r in views.values())
            if not ok or not all(str(v).isdigit() for v in views):
                raise bad(f"sources.{src}.episodes.{split}", "views mapped to [[first, last], ...] ranges", views)
    return record


def pin_episodes(reader: TokenReader, cfg: TrainConfig, record: dict[str, Any], where: str) -> None:
    """Restrict `reader` to exactly the episodes of `record` (what the run started with): a source that is gone, or
    whose recorded episodes are not all there with their split and frames, is refused; sources and episodes that
    are new since are ignored, with a log line."""
    eps = reader.episodes
    recorded = record["sources"]
    have = sorted(str(s) for s in eps.source.unique())
    gone = sorted(set(recorded) - set(have))
    fix = ("a resumed run trains on exactly the sources and episodes it started with: restore them (re-encode "
           "them into this store, or resume with --store naming the store the run was trained on), or start a new "
           "run (--init-from this one keeps its weights)")
    if gone:
        raise UserError(f"{where}: source(s) {gone} the run started with are not in {reader.path} (it holds {have}); "
                        f"{fix}")
    keys = list(zip(eps.source.astype(str), eps.split.astype(str), eps.view.astype(int), eps.episode_index.astype(int)))
    want = {src: {(src, split, int(view), i) for split, views in rec["episodes"].items()
                  for view, ranges in views.items() for i in _expand(ranges)} for src, rec in recorded.items()}
    every = set().union(*want.values())
    keep = np.fromiter((k in every for k in keys), dtype=bool, count=len(keys))
    for src, rec in recorded.items():
        mine = keep & (eps.source.astype(str) == src).to_numpy()
        frames = int(eps.length[mine].sum())
        if int(mine.sum()) != len(want[src]) or frames != rec["frames"]:
            missing = sorted(want[src] - {k for k, m in zip(keys, mine) if m})
            said = f"{len(missing)} of its {len(want[src])} episodes gone or in another split, e.g. episode " \
                f"{missing[0][3]}" if missing else f"{frames} frames where it had {rec['frames']}"
            raise UserError(f"{where}: source {src} changed in {reader.path} since the run started ({said}); {fix}")
    run_rows = eps.source.isin(cfg.sources).to_numpy() if cfg.sources else np.ones(len(eps), dtype=bool)
    _say_ignored(eps[~keep & run_rows], recorded, where)
    reader.episodes = eps[keep].reset_index(drop=True)


def _say_ignored(new, recorded: dict[str, Any], where: str) -> None:
    if new.empty:
        return
    sources = sorted(set(str(s) for s in new.source) - set(recorded))
    more = {s: int((new.source == s).sum()) for s in sorted(set(str(x) for x in new.source) & set(recorded))}
    said = "; ".join([f"new source(s) {sources}"] * bool(sources) + [f"{n} new episode(s) of {s}" for s, n in
                                                                         more.items()])
    log.warning("%s: the store holds what the run did not start with (%s): ignored, a resumed run trains on exactly "
                "the sources and episodes it started with (start a new run, or --init-from this one, to train on "
                "them)", where, said)
