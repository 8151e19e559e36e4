"""What `wmctl eval` returns and writes: `EvalResult` (eval.json), read by attribute by the command line, the report
tables, the plots, the tracker's figures and the scripts. `to_json()` gives exactly the JSON eval.json holds,
`from_json()` reads it back (the horizon and K keys JSON writes as strings become the ints `run_eval` returns).

Nested mappings stay dicts: `conditions` is {condition: {model: scores}}, where scores (`metrics.errors`) is
{"samples": n, "mse" | "mse_single" | "energy" | "mse_moving" | ... | "cosine" | "state_dist": {horizon: value},
"cameras": {camera: {metric: {horizon: value}}}}; see docs/eval.md for every field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.stage import to_jsonable


def _by_int(d: dict) -> dict[int, Any]:
    """A mapping JSON wrote with int keys (horizons, K) -> int keys again."""
    return {int(k): v for k, v in d.items()}


def _scores(e: dict[str, Any]) -> dict[str, Any]:
    """One model's scores in one condition (`metrics.errors`, pooled), keys back to horizons."""
    out: dict[str, Any] = {}
    for key, v in e.items():
        if key == "samples":
            out[key] = v
        elif key == "cameras":
            out[key] = {c: {m: _by_int(x) for m, x in row.items()} for c, row in v.items()}
        else:
            out[key] = _by_int(v)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class KSweep:
    """Error against the number of sampling steps K on the first condition: `mse`, `mse_single`, `energy` are
    {str(K): {horizon: value}} (string K, as eval.json always had them), `mean_mse` / `mean_energy` {K: mean over
    horizons}; `best_k` by mean energy score."""

    condition: str
    samples: int
    mse: dict[str, dict[int, float]]
    mse_single: dict[str, dict[int, float]]
    energy: dict[str, dict[int, float]]
    mean_mse: dict[int, float]
    mean_energy: dict[int, float]
    best_k: int
    k_within_10pct_of_best: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KSweep:
        per_k = {key: {str(k): _by_int(v) for k, v in d[key].items()} for key in ("mse", "mse_single", "energy")}
        return cls(condition=d["condition"], samples=d.get("samples", 1), **per_k, mean_mse=_by_int(d["mean_mse"]),
                   mean_energy=_by_int(d["mean_energy"]), best_k=int(d["best_k"]),
                   k_within_10pct_of_best=d["k_within_10pct_of_best"])


# Fields written only when there is something to write: k_sweep (a sampler), action_effect (labelled windows and an
# action-conditioned model), scene_probe (--probe), plots and rollouts (after the figures are drawn); probe is written
# with the scene probe even when None (null: the store has no states). `out` is where it was written: never in the file.
_OPTIONAL = ("k_sweep", "action_effect", "scene_probe", "plots", "rollouts")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalResult:
    model: str  # the evaluated model's name (run/checkpoint): its key in `conditions`
    kind: str
    store: str
    context: int
    horizons: list[int]
    k: int
    split: str
    weights: str
    seed: int
    samples: dict[str, int]  # per model: samples scored per window
    moving_fraction: float
    cameras: list[str]
    source_cameras: dict[str, list[str]]  # each source's cameras, by the model's slot names
    trained_window: int  # training saw windows of this many frames; rollouts slide it (trainer.sampling)
    context_used: dict[str, int]  # per model: the last context frames that fit its window
    slides_after_horizon: dict[str, int]
    windows: dict[str, int]  # per window group ("labelled", "free"): windows scored
    conditions: dict[str, dict[str, dict[str, Any]]]  # {condition: {model | copy_last | ...: scores}}
    per_source: dict[str, dict[str, dict[str, Any]]]  # {condition: {source: {"windows": n, model: scores, ...}}}
    splits: dict[str, str]  # per source: how its manifest split the episodes
    k_sweep: KSweep | None = None
    action_effect: dict[str, dict[str, dict[int, float]]] | None = None  # {model: {moved|true_change|share: {h: v}}}
    probe: dict[str, dict[str, dict[int, float]]] | None = None  # {condition: {true_latents|predicted_latents: ..}}
    scene_probe: dict[str, Any] | None = None  # {source: featurestore.probe.probe_source's result}
    seconds: float = 0.0
    plots: list[str] | None = None
    rollouts: list[str] | None = None
    out: str | None = None

    def to_json(self) -> dict[str, Any]:
        """eval.json's content, exactly: keys and nesting as always, horizon and K keys as strings."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "out" or (f.name in _OPTIONAL and v is None):
                continue
            if f.name == "probe" and v is None and self.scene_probe is None:
                continue
            d[f.name] = v
        return to_jsonable(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EvalResult:
        """An EvalResult from eval.json's content (`to_json`'s inverse; keys back to ints where run_eval has ints)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"out"}
        kw = {k: v for k, v in d.items() if k in names}
        kw["conditions"] = {c: {m: _scores(e) for m, e in entry.items()} for c, entry in d["conditions"].items()}
        kw["per_source"] = {c: {src: {m: (e if m == "windows" else _scores(e)) for m, e in row.items()}
                                for src, row in by_src.items()} for c, by_src in d.get("per_source", {}).items()}
        if d.get("k_sweep") is not None:
            kw["k_sweep"] = KSweep.from_json(d["k_sweep"])
        if d.get("action_effect") is not None:
            kw["action_effect"] = {m: {key: _by_int(v) for key, v in e.items()} for m, e in d["action_effect"].items()}
        if d.get("probe") is not None:
            kw["probe"] = {c: {key: _by_int(v) for key, v in row.items()} for c, row in d["probe"].items()}
        for key, default in (("moving_fraction", 0.1), ("source_cameras", {}), ("context_used", {}),
                             ("slides_after_horizon", {}), ("splits", {}), ("samples", {}), ("cameras", [])):
            kw.setdefault(key, default)  # eval.json files written before these fields existed
        return cls(**kw)
