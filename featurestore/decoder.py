"""Visualisation decoder: frozen patch tokens of one camera -> RGB pixels, and `wmctl decoder train`.

A 1x1 projection of each token, then transposed convolutions that double the resolution until one token
becomes a patch_size x patch_size block (16 -> 4 doublings), as in DINO-WM's decoder. Trained with L2 from
store tokens against the original frames (decoded with the same FrameSource as encode, resized and cropped
as the encoder saw them). No perceptual loss: every usable one (LPIPS, VGG) needs pretrained weights that
cannot be fetched offline. It is for looking only: `decoder_loss` detaches its input, so no gradient ever
reaches a world model through it. Legend: B = images, gh/gw = token grid, Z = token width, H/W = pixels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file

from featurestore.encoders import Preprocess, resize_crop
from featurestore.reader import TokenReader
from pipeline.frames import PyAVFrameSource
from pipeline.machine import resolve_device
from pipeline.manifest import camera_span, read_manifest
from pipeline.stage import UserError, atomic_output, atomic_write_json

log = logging.getLogger(__name__)


class TokenDecoder(nn.Module):
    """Patch tokens -> pixels: a 1x1 projection, then stride-2 transposed convolutions up to the patch size. A patch
    size that is not a power of two (DINOv2's 14) is upsampled to the next power of two (16) and resized to the
    frame (bilinear) before the output convolution."""

    def __init__(self, enc_dim: int, grid: tuple[int, int], patch_size: int, width: int = 128):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch size {patch_size} must be positive")
        self.grid, self.patch_size = grid, patch_size
        ups = math.ceil(math.log2(patch_size))
        chans = [max(16, width >> i) for i in range(ups + 1)]
        self.inp = nn.Sequential(nn.Conv2d(enc_dim, chans[0], 1), nn.GroupNorm(8, chans[0]), nn.SiLU(),
                                 nn.Conv2d(chans[0], chans[0], 3, padding=1))
        layers = []
        for i in range(ups):
            layers += [nn.GroupNorm(8, chans[i]), nn.SiLU(),
                       nn.ConvTranspose2d(chans[i], chans[i + 1], 4, stride=2, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.SiLU(), nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, tokens_BPZ: torch.Tensor) -> torch.Tensor:
        """Normalised tokens [B, gh*gw, Z] -> pixels [B, 3, gh*p, gw*p] in [0, 1] (sigmoid)."""
        x = rearrange(tokens_BPZ, "b (h w) z -> b z h w", h=self.grid[0], w=self.grid[1])
        x = self.up(self.inp(x))
        size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(x))


def decoder_loss(decoder: nn.Module, latents_BPZ: torch.Tensor, frames_B3HW: torch.Tensor) -> torch.Tensor:
    """Pixel MSE of the decoded latents. The latents are detached: the decoder never shapes what feeds it."""
    return (decoder(latents_BPZ.detach()) - frames_B3HW).pow(2).mean()


def psnr(mse: float) -> float:
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    store: Path
    out: Path  # the decoder's folder (the CLI's default: a new runs/<time>-decoder)
    source: str | None = None  # default: the store's first source
    camera: int = 0  # index into the source's cameras
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    width: int = 64
    max_frames: int = 4000
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_frames", "width"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.camera < 0:
            raise UserError(f"--camera {self.camera}: a camera index counts from 0")
        if not self.lr > 0:
            raise UserError(f"lr {self.lr}: must be positive")


def preprocess_geometry(frames_BHWC: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """uint8 frames -> float [B, 3, h, w] in [0, 1], resized/cropped exactly as the encoder saw them."""
    x = torch.from_numpy(np.ascontiguousarray(frames_BHWC)).permute(0, 3, 1, 2).float() / 255
    return resize_crop(x, pre.height, pre.width, pre.resize, pre.interpolation, pre.antialias).clamp(0, 1)


class EpisodeFrames:
    """The original frames of store episodes, decoded from their LeRobot videos.

    One PyAVFrameSource and one read of each manifest for all episodes: episodes asked for in file order decode
    straight on through a shared video file instead of seeking back to a keyframe for every episode.
    """

    def __init__(self, reader: TokenReader):
        self.reader, self._manifests, self._src = reader, {}, PyAVFrameSource()

    def _manifest(self, source: str):
        if source not in self._manifests:
            self._manifests[source] = read_manifest(Path(self.reader.source_attrs(source)["manifest"]))
        return self._manifests[source]

    def __call__(self, row: int, camera: int) -> np.ndarray:
        """Frames [L, H, W, 3] of store episode `row`, camera index `camera` of its source."""
        e = self.reader.episodes.iloc[row]
        attrs = self.reader.source_attrs(e.source)
        manifest, meta = self._manifest(e.source)
        m = manifest[manifest.episode_index == int(e.episode_index)]
        if m.empty:
            raise UserError(f"episode {e.episode_index} is not in {attrs['manifest']} (re-run ingest for "
                            f"{e.source}, or re-encode the store from the current manifest)")
        m = m.iloc[0]
        k = list(m.camera_keys).index(attrs["cameras"][camera])
        return self._src.read_episode(camera_span(Path(m.root), m, k, meta["fps"]))

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> EpisodeFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def episode_frames(reader: TokenReader, row: int, camera: int) -> np.ndarray:
    """The original frames [L, H, W, 3] of one store episode's camera (see EpisodeFrames for many)."""
    with EpisodeFrames(reader) as frames:
        return frames(row, camera)


def load_pairs(reader: TokenReader, source: str, camera: int, split: str, max_frames: int, pre: Preprocess,
               rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """(raw tokens [F, P, Z], target frames [F, 3, h, w]) for up to max_frames frames of `split` episodes."""
    eps = reader.episodes
    eps = eps[(eps.source == source) & (eps.split == split) & (eps.view == 0)]
    if eps.empty:
        raise UserError(f"{reader.path}: source {source!r} has no committed {split} episodes")
    per_ep = max(1, max_frames // len(eps))
    toks, frames = [], []
    with EpisodeFrames(reader) as episode_frames_of:
        for row in eps.index:
            patch = reader.episode(int(row), ("patch",))["patch"][:, camera]  # [L, P, Z]
            idx = np.sort(rng.choice(len(patch), size=min(per_ep, len(patch)), replace=False))
            imgs = episode_frames_of(int(row), camera)
            toks.append(patch[idx])
            frames.append(preprocess_geometry(imgs[idx], pre))
    return np.concatenate(toks), torch.cat(frames)


def save_decoder(out: Path, decoder: TokenDecoder, meta: dict[str, Any]) -> None:
    """The weights, then decoder.json (the marker a reader looks for), each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "decoder.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, tmp)
    atomic_write_json(out / "decoder.json", meta)


DECODER_KEYS = {"enc_dim": int, "grid": list, "patch_size": int, "width": int, "camera": int, "source": str,
                "encoder": dict, "token_mean": list, "token_std": list}


def load_decoder(path: Path) -> tuple[TokenDecoder, dict[str, Any]]:
    path = Path(path)
    if not (path / "decoder.json").is_file():
        raise UserError(f"{path} holds no decoder (decoder.json); train one with `wmctl decoder train`")
    meta = _decoder_meta(path / "decoder.json")
    weights = path / "decoder.safetensors"
    try:
        dec = TokenDecoder(meta["enc_dim"], tuple(meta["grid"]), meta["patch_size"], meta["width"])
        dec.load_state_dict(load_file(weights))
    except FileNotFoundError:
        raise _damaged_decoder(weights, "the file is missing") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: safetensors, torch and shapes all differ
        raise _damaged_decoder(weights, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                               ) from None
    return dec.eval().requires_grad_(False), meta


def _decoder_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_bytes())
    except ValueError as e:  # not JSON, not UTF-8
        raise _damaged_decoder(file, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise _damaged_decoder(file, f"a JSON {type(meta).__name__}, not an object")
    for key, t in DECODER_KEYS.items():
        v = meta.get(key)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise _damaged_decoder(file, f"`{key}` is {v!r:.60}, not {t.__name__}")
    return meta


def _damaged_decoder(file: Path, reason: str) -> UserError:
    return UserError(f"{file} cannot be read ({reason}): the decoder {file.parent} is damaged. Train it again "
                     f"(`wmctl decoder train --out {file.parent}`) or pass another --decoder")


def normalize_tokens(raw: np.ndarray | torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
    return (t - torch.tensor(meta["token_mean"])) / torch.tensor(meta["token_std"])


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle learning rate, warming up over 5% of the steps. torch's OneCycleLR divides by the warm-up's length
    in steps (5% of the steps, less one: zero at 20 steps and below): a run that short warms up over 1.5 steps,
    and a single step runs at `lr`."""
    if steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                               pct_start=0.05 if steps * 0.05 > 1 else 1.5 / steps)


def _pick_source(reader: TokenReader, cfg: DecoderConfig) -> str:
    """The source to train on (default the first) and a check that it has camera `cfg.camera`."""
    sources = reader.store.sources()
    source = cfg.source or (sources[0] if sources else None)
    if source not in sources:
        raise UserError(f"{cfg.store}: no source {source!r} to train a decoder on (it has {sources})")
    cameras = reader.source_attrs(source).get("cameras") or []
    if cfg.camera >= len(cameras):
        raise UserError(f"--camera {cfg.camera}: source {source} has {len(cameras)} camera(s) {cameras}; pass 0 to "
                        f"{len(cameras) - 1}")
    return source


def run_decoder_train(cfg: DecoderConfig, *, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train the decoder (`cfg.steps` optimizer steps; `on_progress(1)` after each) and save it with its val PSNR
    against the mean image's."""
    t0 = time.monotonic()
    reader = TokenReader(cfg.store)
    source = _pick_source(reader, cfg)
    enc = reader.encoder
    pre = Preprocess.from_dict(enc["preprocess"])
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    tr_tok, tr_img = load_pairs(reader, source, cfg.camera, "train", cfg.max_frames, pre, rng)
    va_tok, va_img = load_pairs(reader, source, cfg.camera, "val", max(64, cfg.max_frames // 8), pre, rng)
    mean, std = tr_tok.reshape(-1, tr_tok.shape[-1]).mean(0), tr_tok.reshape(-1, tr_tok.shape[-1]).std(0) + 1e-6
    meta: dict[str, Any] = {"source": source, "camera": cfg.camera, "camera_key": reader.source_attrs(source)["cameras"]
                            [cfg.camera], "enc_dim": int(enc["dim"]), "grid": list(enc["grid"]),
                            "patch_size": int(enc["patch_size"]), "width": cfg.width, "encoder": enc,
                            "token_mean": mean.tolist(), "token_std": std.tolist(), "config": {
                                k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}}
    dev = resolve_device(cfg.device)
    dec = TokenDecoder(meta["enc_dim"], tuple(meta["grid"]), meta["patch_size"], cfg.width).to(dev)
    x_tr, x_va = normalize_tokens(tr_tok, meta), normalize_tokens(va_tok, meta)
    _fit(dec, x_tr, tr_img, cfg, dev, on_progress)
    dec.eval()
    with torch.no_grad():
        val_mse = float(np.mean([float((dec(x_va[i:i + 64].to(dev)).cpu() - va_img[i:i + 64]).pow(2).mean())
                                 for i in range(0, len(x_va), 64)]))
    mean_img = tr_img.mean(0, keepdim=True)
    baseline_mse = float((va_img - mean_img).pow(2).mean())
    meta.update({"val_psnr": psnr(val_mse), "mean_image_psnr": psnr(baseline_mse), "train_frames": len(x_tr),
                 "val_frames": len(x_va), "seconds": time.monotonic() - t0})
    save_decoder(cfg.out, dec.cpu(), meta)
    meta["out"] = str(cfg.out)
    return meta


def _fit(dec: nn.Module, x_tr: torch.Tensor, img_tr: torch.Tensor, cfg: DecoderConfig, dev: torch.device,
         on_progress: Callable[[int], None] | None) -> None:
    """`cfg.steps` AdamW steps of the pixel L2 on random train batches (one-cycle learning rate)."""
    opt = torch.optim.AdamW(dec.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = one_cycle(opt, cfg.lr, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(x_tr), (cfg.batch_size,), generator=g)
        loss = decoder_loss(dec, x_tr[idx].to(dev), img_tr[idx].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_progress is not None:
            on_progress(1)
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log.info("decoder step %d/%d: train L2 %.5f", step + 1, cfg.steps, float(loss.detach()))
