"""`wmctl eval`: how far ahead a world model can be trusted, with and without actions, against copy-last and
baselines, on held-out windows (`run.py`; docs/eval.md).

config.py   EvalConfig, CONDITIONS
windows.py  the evaluation windows (`collect_windows`), a model's predictions on them (`predict`, `sample_set`),
            the train-split error of a point forecast (`calibrate_noise`)
metrics.py  the scores, pure functions of arrays (`window_scores`, `errors`, `energy_score`, `pool`, ...)
probe.py    the proprio probe and the scene probe
run.py      `run_eval`: the conditions, the K sweep, the action effect, the probes -> an EvalResult
result.py   EvalResult (eval.json, read by attribute; `to_json` / `from_json`)
output.py   where eval writes: eval.json, plots, rollout grids, the tracker's figures
report.py   the one-screen tables;  plots.py  the PNG plots
"""

from trainer.eval.config import CONDITIONS, EvalConfig
from trainer.eval.metrics import (
    action_effect,
    energy_score,
    errors,
    mean_prediction_mse,
    moving_tokens,
    pool,
    r2,
    state_distance,
    window_scores,
    with_calibrated_noise,
)
from trainer.eval.probe import fit_probe, proprio_probe, scene_probe
from trainer.eval.report import eval_tables
from trainer.eval.result import EvalResult, KSweep
from trainer.eval.run import camera_names, run_eval
from trainer.eval.windows import Windows, calibrate_noise, collect_windows, predict, sample_set, samples_of

__all__ = [
    "CONDITIONS", "EvalConfig", "EvalResult", "KSweep", "Windows", "action_effect", "calibrate_noise", "camera_names",
    "collect_windows", "energy_score", "errors", "eval_tables", "fit_probe", "mean_prediction_mse", "moving_tokens",
    "pool", "predict", "proprio_probe", "r2", "run_eval", "sample_set", "samples_of", "scene_probe", "state_distance",
    "window_scores", "with_calibrated_noise",
]
