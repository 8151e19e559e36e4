"""The one-screen summary of an eval result (rich tables)."""

from __future__ import annotations

from typing import Any


def eval_tables(result: dict[str, Any]) -> list:
    from rich.table import Table

    hs = [int(h) for h in result["horizons"]]
    tables = []
    main = result["model"]
    beyond = set(result.get("beyond_trained_window", []))
    caption = (f"* context + horizon exceeds the {result['trained_window']} frames training saw: a regime nothing "
               "trained") if beyond else None
    t = Table(title=f"latent MSE (cosine distance) at horizon, {main} ({result['kind']}), context "
                    f"{result['context']} frames, K={result['k']}, {result['split']} windows {result['windows']}",
              caption=caption)
    t.add_column("condition")
    t.add_column("model")
    for h in hs:
        t.add_column(f"h={h}{'*' if h in beyond else ''}", justify="right")
    for cond, entry in result["conditions"].items():
        for name, errs in entry.items():
            best = {h: min(e["mse"][h] for e in entry.values()) for h in hs}
            cells = []
            for h in hs:
                txt = f"{errs['mse'][h]:.4f} ({errs['cosine'][h]:.3f})"
                cells.append(f"[bold green]{txt}[/]" if errs["mse"][h] == best[h] else txt)
            t.add_row(cond.replace("_", " "), "this model" if name == main else name, *cells)
        t.add_section()
    tables.append(t)
    sweep = result.get("k_sweep")
    if sweep:
        ks = sorted(int(k) for k in sweep["mse"])
        t = Table(title=f"MSE vs sampling steps K ({sweep['condition'].replace('_', ' ')}); best K={sweep['best_k']}, "
                        f"K={result['k']} within 10% of best: {sweep['k_within_10pct_of_best']}")
        t.add_column("K")
        for h in hs:
            t.add_column(f"h={h}", justify="right")
        t.add_column("mean", justify="right")
        for k in ks:
            row = sweep["mse"][str(k)]
            t.add_row(str(k), *[f"{row[h]:.4f}" for h in hs], f"{sweep['mean_mse'][k]:.4f}")
        tables.append(t)
    probe = result.get("probe")
    if probe:
        t = Table(title="linear probe latents -> proprio state: R^2 on val (fit on train, true latents)")
        t.add_column("condition")
        t.add_column("latents")
        for h in hs:
            t.add_column(f"h={h}", justify="right")
        for cond, row in probe.items():
            for kind in ("true_latents", "predicted_latents"):
                t.add_row(cond.replace("_", " "), kind.split("_")[0], *[f"{row[kind].get(h, float('nan')):.3f}"
                                                                         for h in hs])
        tables.append(t)
    return tables
