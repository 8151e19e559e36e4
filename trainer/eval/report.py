"""The one-screen summary of an eval result (rich tables), read from its `EvalResult`."""

from __future__ import annotations

from trainer.eval.result import EvalResult


def _cells(errs: dict, hs: list[int], keys: tuple[str, ...], best: dict[int, float] | None = None) -> list[str]:
    cells = []
    for h in hs:
        txt = " / ".join(f"{errs[k][h]:.3f}" for k in keys)
        cells.append(f"[bold green]{txt}[/]" if best is not None and errs["mse"][h] == best[h] else txt)
    return cells


def _per_horizon(title: str, hs: list[int], *columns: str):
    """A table with these leading columns and one per horizon."""
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for h in hs:
        t.add_column(f"h={h}", justify="right")
    return t


def eval_tables(result: EvalResult) -> list:
    """The tables of an eval, in the order printed: the scores per condition, the predicted robot state, per
    camera, error vs K, the proprio probe, the action effect and the scene probe (those with something to show)."""
    hs = [int(h) for h in result.horizons]
    main = result.model
    tables = [_scores_table(result, hs, main)]
    if any("state_dist" in e for entry in result.conditions.values() for e in entry.values()):
        tables.append(_state_table(result, hs, main))
    if len(result.cameras) > 1:
        tables.append(_camera_table(result, hs, main))
    if result.k_sweep:
        tables.append(_k_sweep_table(result, hs))
    if result.probe:
        tables.append(_probe_table(result, hs))
    return tables + _action_effect_table(result, hs, main) + _scene_probe_tables(result)


def _scores_table(result: EvalResult, hs: list[int], main: str):
    from rich.table import Table

    t = Table(title=f"{main} ({result.kind}), context {result.context} frames, K={result.k}, "
                    f"{result.split} windows {result.windows}: per horizon, MSE of the sample mean / mean "
                    f"single-sample MSE / energy score / MSE of the mean on moving tokens (top "
                    f"{result.moving_fraction:.0%} by true change); normalised tokens, lower is better",
              caption=f"rollouts slide the trained {result.trained_window}-frame window (every horizon inside "
                      "the trained regime); bold: lowest sample-mean MSE")
    t.add_column("condition")
    t.add_column("model (samples)")
    for h in hs:
        t.add_column(f"h={h}", justify="right")
    keys = ("mse", "mse_single", "energy", "mse_moving")
    for cond, entry in result.conditions.items():
        best = {h: min(e["mse"][h] for e in entry.values()) for h in hs}
        for name, errs in entry.items():
            label = "this model" if name == main else name
            t.add_row(cond.replace("_", " "), f"{label} ({errs.get('samples', result.samples.get(name, 1))})",
                      *_cells(errs, hs, keys, best))
        t.add_section()
    return t


def _state_table(result: EvalResult, hs: list[int], main: str):
    t = _per_horizon("predicted robot state: distance of the sample mean to the true state, in the state's "
                     "units (copy-last: the robot stays where it was)", hs, "condition", "model")
    for cond, entry in result.conditions.items():
        for name, errs in entry.items():
            if "state_dist" in errs:
                t.add_row(cond.replace("_", " "), "this model" if name == main else name,
                          *[f"{errs['state_dist'][h]:.2f}" for h in hs])
        t.add_section()
    return t


def _camera_table(result: EvalResult, hs: list[int], main: str):
    t = _per_horizon("per camera: MSE of the sample mean / energy score", hs, "condition", "model", "camera")
    for cond, entry in result.conditions.items():
        for name, errs in entry.items():
            for cam, row in errs.get("cameras", {}).items():
                t.add_row(cond.replace("_", " "), "this model" if name == main else name, cam,
                          *_cells(row, hs, ("mse", "energy")))
        t.add_section()
    return t


def _k_sweep_table(result: EvalResult, hs: list[int]):
    from rich.table import Table

    sweep = result.k_sweep
    ks = sorted(int(k) for k in sweep.mse)
    t = Table(title=f"error vs sampling steps K ({sweep.condition.replace('_', ' ')}, {sweep.samples} "
                    f"samples): MSE of the mean / single-sample MSE / energy score; best K by energy score="
                    f"{sweep.best_k}, K={result.k} within 10% of best: {sweep.k_within_10pct_of_best}")
    t.add_column("K")
    for h in hs:
        t.add_column(f"h={h}", justify="right")
    t.add_column("mean energy", justify="right")
    for k in ks:
        row = {key: getattr(sweep, key)[str(k)] for key in ("mse", "mse_single", "energy")}
        t.add_row(str(k), *_cells(row, hs, ("mse", "mse_single", "energy")), f"{sweep.mean_energy[k]:.4f}")
    return t


def _probe_table(result: EvalResult, hs: list[int]):
    from rich.table import Table

    t = Table(title="linear probe latents -> proprio state: R^2 on val (fit on train, true latents)")
    t.add_column("condition")
    t.add_column("latents")
    for h in hs:
        t.add_column(f"h={h}", justify="right")
    for cond, row in result.probe.items():
        for kind in ("true_latents", "predicted_latents"):
            t.add_row(cond.replace("_", " "), kind.split("_")[0], *[f"{row[kind].get(h, float('nan')):.3f}"
                                                                     for h in hs])
    return t


def _action_effect_table(result: EvalResult, hs: list[int], main: str) -> list:
    effect = result.action_effect
    if not effect:
        return []
    t = _per_horizon("how far the actions move the prediction: mean squared difference of the sample means with the "
                     "actions and with the null action / the true frame's change from the last context frame "
                     "(share)", hs, "model")
    any_model = next(iter(effect.values()))
    t.add_row("true change", *[f"{any_model['true_change'][h]:.3f}" for h in hs])
    for name, e in effect.items():
        t.add_row("this model" if name == main else name,
                  *[f"{e['moved'][h]:.3f} ({e['share'][h]:.0%})" for h in hs])
    return [t]


def _scene_probe_tables(result: EvalResult) -> list:
    from rich.table import Table

    tables = []
    for src, r in (result.scene_probe or {}).items():
        first = next(iter(r["views"].values()))
        t = Table(title=f"scene probe, {src} ({r['sim']}): tokens -> the simulator's state, out-of-fold R^2 "
                        f"({r['frames']} frames of {r['episodes']} episodes); raw: the store's patch tokens, model: "
                        "after the model's merge and input projection")
        t.add_column("view / kernel")
        for k in first["r2"]:
            t.add_column(k, justify="right")
        for view, v in r["views"].items():
            t.add_row(view, *(f"{x:.3f}" for x in v["r2"].values()))
        tables.append(t)
    return tables
