"""PNG plots of an eval result: error vs horizon per condition (with baselines), error vs K."""

from __future__ import annotations

from pathlib import Path

from trainer.eval.result import EvalResult


def plot_eval(result: EvalResult, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    conds = result.conditions
    if conds:
        rows = (("mse", "MSE of the sample mean"), ("energy", "energy score"), ("mse_moving", "MSE, moving tokens"))
        fig, axes = plt.subplots(len(rows), len(conds), figsize=(4.5 * len(conds), 3.2 * len(rows)), squeeze=False)
        for col, (cond, entry) in enumerate(conds.items()):
            for row, (key, label) in enumerate(rows):
                ax = axes[row][col]
                for name, errs in entry.items():
                    hs = sorted(int(h) for h in errs[key])
                    style = "--" if name == "copy_last" else "-"
                    ax.plot(hs, [errs[key][h] for h in hs], style, marker="o", label=name)
                ax.set_title(f"{cond.replace('_', ' ')}: {label}", fontsize=9)
                ax.set_xlabel("horizon (frames)")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / "error_vs_horizon.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    sweep = result.k_sweep
    if sweep:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        ks = sorted(int(k) for k in sweep.mse)
        hs = sorted(int(h) for h in sweep.mse[str(ks[0])])
        for h in hs:
            ax.plot(ks, [sweep.energy[str(k)][h] for k in ks], marker="o", label=f"h={h}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps K")
        ax.set_ylabel("energy score")
        ax.set_title(f"error vs K ({sweep.condition.replace('_', ' ')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "error_vs_k.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files
