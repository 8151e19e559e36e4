"""Study: can a small learned read-out decode from frozen tokens what a linear probe cannot (e.g. pusht's block
angle)? The same frames, targets and 5 folds of whole episodes as `wmctl probe`; the read-out: the patch tokens
projected to 64 channels with learned position embeddings, 4 learned queries attending over them, a 2-layer MLP on
the pooled result, trained per fold with AdamW. Prints the out-of-fold R^2 per target (docs/results.md, 2026-12-07).

    python scripts/attention_probe.py --store demo/tokens.zarr [--source pusht-demo] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn as nn

from featurestore.probe import ProbeConfig, load_probe_data, probe_sources, r2, split_groups
from featurestore.reader import TokenReader


class AttentionReadout(nn.Module):
    def __init__(self, tokens: int, dim: int, targets: int, width: int = 64, queries: int = 4):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(tokens, width))
        self.inp = nn.Linear(dim, width)
        self.q = nn.Parameter(torch.randn(queries, width) / width**0.5)
        self.mlp = nn.Sequential(nn.Linear(queries * width, 128), nn.GELU(), nn.Linear(128, targets))

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        h_NPW = torch.nn.functional.gelu(self.inp(x_NPD) + self.pos)
        a_NQP = torch.softmax(torch.einsum("qw,npw->nqp", self.q, h_NPW) / h_NPW.shape[-1] ** 0.5, -1)
        return self.mlp(torch.einsum("nqp,npw->nqw", a_NQP, h_NPW).flatten(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--source", default=None)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--max-frames", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    reader = TokenReader(args.store)
    found = probe_sources(reader)
    src = args.source or next(iter(found))
    data = load_probe_data(reader, src, found[src], ProbeConfig(store=args.store, max_frames=args.max_frames))
    x_NPD = torch.tensor(data.patch_NCPD.reshape(len(data.patch_NCPD), -1, data.patch_NCPD.shape[-1]),
                         dtype=torch.float32)
    x_NPD = (x_NPD - x_NPD.mean((0, 1))) / x_NPD.std((0, 1))
    names = list(data.targets)
    Y = np.stack([data.targets[k] for k in names], 1)
    y = torch.tensor((Y - Y.mean(0)) / Y.std(0), dtype=torch.float32)
    torch.manual_seed(args.seed)
    pred = np.zeros_like(Y)
    for fold in split_groups(data.episode_N, 5, np.random.default_rng(args.seed)):
        test = np.isin(data.episode_N, fold)
        model = AttentionReadout(x_NPD.shape[1], x_NPD.shape[2], Y.shape[1])
        opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
        xt, yt = x_NPD[~test], y[~test]
        for _ in range(args.steps):
            i = torch.randint(0, len(xt), (128,))
            loss = ((model(xt[i]) - yt[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred[test] = model(x_NPD[test]).numpy() * Y.std(0) + Y.mean(0)
    print(json.dumps({"source": src, "frames": len(Y), "episodes": int(len(np.unique(data.episode_N))),  # noqa: T201
                      "r2": {k: round(float(v), 3) for k, v in zip(names, r2(pred, Y))}}))


if __name__ == "__main__":
    main()
