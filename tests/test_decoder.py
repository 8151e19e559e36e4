"""Visualisation decoder: no gradient into the dynamics, beats the mean image, and visualize writes files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore.decoder import DecoderConfig, TokenDecoder, decoder_loss, load_decoder, run_decoder_train
from trainer.config import tiny
from trainer.model.dynamics import ShortcutDynamics
from trainer.tokens import TokenShape
from trainer.visualize import VisualizeConfig, run_visualize


def test_dynamics_parameters_get_no_gradient_from_the_decoder_loss():
    shape = TokenShape(cameras=1, grid=(2, 2), enc_dim=16, action_dim=2)
    dyn = ShortcutDynamics(tiny().model, shape)
    dec = TokenDecoder(16, (2, 2), 16, width=16)
    z = torch.randn(2, 3, 4, 16)
    latents = dyn(z, torch.full((2, 3), 0.5), torch.full((2, 3), 0.125))  # [B, T, N, Z], part of dyn's graph
    assert latents.requires_grad
    loss = decoder_loss(dec, latents[:, -1], torch.rand(2, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None for p in dyn.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters() if p.dim() > 1)


@pytest.fixture(scope="module")
def decoder_store(tmp_path_factory, tiny_encoder):
    """Many short pusht episodes: a decoder generalises to held-out episodes only after seeing many T placements."""
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess
    from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig

    base = tmp_path_factory.mktemp("decdata")
    root = base / "pusht-many"
    run_data_pusht(PushtDataConfig(out=root, episodes=64, frames_per_episode=4, size=64, seed=3,
                                   repo_id="local/pusht-many"))
    manifest = base / "pusht-many.parquet"
    run_ingest(IngestConfig(source="pusht", root=root, repo_id="local/pusht-many", out=manifest, val_fraction=0.3))
    store = base / "many.zarr"
    run_encode(EncodeConfig(manifest=manifest, store=store, encoder=str(tiny_encoder),
                            preprocess=Preprocess(height=64, width=64), batch_size=32, threads=1))
    return store


@pytest.fixture(scope="module")
def decoder_dir(decoder_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "decoder"
    res = run_decoder_train(DecoderConfig(store=decoder_store, source="pusht", out=out, steps=400, batch_size=32,
                                          width=64, max_frames=400, lr=1e-3))
    return out, res


def test_decoder_beats_the_mean_image(decoder_dir):
    out, res = decoder_dir
    assert res["val_psnr"] > res["mean_image_psnr"] + 0.75, (res["val_psnr"], res["mean_image_psnr"])
    dec, meta = load_decoder(out)
    assert meta["grid"] == [4, 4] and meta["camera_key"] == "observation.image"
    assert dec(torch.zeros(1, 16, 32)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("suffix", [".png", ".gif", ".mp4"])
def test_visualize_writes_side_by_side_rollouts(tiny_run, decoder_dir, tmp_path, suffix):
    out = tmp_path / f"rollout{suffix}"
    res = run_visualize(VisualizeConfig(run=tiny_run, out=out, decoder=decoder_dir[0], horizon=4, scale=1))
    assert out.stat().st_size > 1000
    assert res["rows"] == ["ground truth", "decoded true latents", "prediction, with actions",
                           "prediction, null action"]
    if suffix == ".png":
        img = np.asarray(Image.open(out))
        assert img.shape[0] > 4 * 64 and img.shape[1] > res["frames"] * 64
    if suffix == ".mp4":
        import av

        with av.open(str(out)) as c:
            assert sum(1 for _ in c.decode(video=0)) == res["frames"]


def test_eval_writes_rollout_grids_with_a_decoder(tiny_run, decoder_dir, tmp_path):
    from trainer.eval import EvalConfig, run_eval

    res = run_eval(EvalConfig(ckpt=tiny_run, horizons=(1, 2), episodes=1, probe=False, plots=False,
                              out=tmp_path / "eval", decoder=decoder_dir[0], rollouts=2))
    from featurestore.reader import TokenReader

    eps = TokenReader(res.store).episodes
    n_val = int(((eps.source == "pusht") & (eps.split == "val") & (eps.view == 0)).sum())
    assert n_val >= 1 and len(res.rollouts) == min(2, n_val)
    for p in res.rollouts:
        img = np.asarray(Image.open(p))
        assert img.shape[0] > 4 * 64  # four rows of 64-px frames (plus labels)


@pytest.mark.parametrize("patch", [14, 16])
def test_the_decoder_makes_whole_frames_for_any_patch_size_and_learns_them(patch):
    """DINOv2's 14-px patches (the demos' encoder at 112 px: 8x8 of 14) as well as powers of two: the output is the
    frame's exact size, and a few steps fit two different frames from their tokens better than at the start."""
    torch.manual_seed(0)
    grid = (4, 4)
    dec = TokenDecoder(enc_dim=8, grid=grid, patch_size=patch, width=32)
    tokens = torch.randn(2, 16, 8)
    frames = torch.rand(2, 3, 4 * patch, 4 * patch)
    assert dec(tokens).shape == frames.shape
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (dec(tokens) - frames).pow(2).mean()
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.8 * first
