"""PNG plots of an eval result: error vs horizon per condition (with baselines), error vs K."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_eval(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    conds = result["conditions"]
    if conds:
        fig, axes = plt.subplots(1, len(conds), figsize=(4.5 * len(conds), 3.6), squeeze=False)
        for ax, (cond, entry) in zip(axes[0], conds.items()):
            for name, errs in entry.items():
                hs = sorted(int(h) for h in errs["mse"])
                style = "--" if name == "copy_last" else "-"
                ax.plot(hs, [errs["mse"][h] for h in hs], style, marker="o", label=name)
            ax.set_title(cond.replace("_", " "))
            ax.set_xlabel("horizon (frames)")
            ax.set_ylabel("latent MSE (normalised tokens)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / "error_vs_horizon.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    sweep = result.get("k_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ks = sorted(int(k) for k in sweep["mse"])
        hs = sorted(int(h) for h in sweep["mse"][str(ks[0])])
        for h in hs:
            ax.plot(ks, [sweep["mse"][str(k)][h] for k in ks], marker="o", label=f"h={h}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps K")
        ax.set_ylabel("latent MSE")
        ax.set_title(f"error vs K ({sweep['condition'].replace('_', ' ')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "error_vs_k.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
