"""`wmctl visualize`: side by side, the ground truth, the decoded true latents and the decoded rollouts
(with the episode's actions and with the null action), with frame numbers, as .png, .gif or .mp4.

The decoder only looks: predictions are made under no_grad and decoded afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from featurestore.decoder import episode_frames, load_decoder, normalize_tokens, preprocess_geometry
from featurestore.encoders import Preprocess, check_same_encoder
from featurestore.reader import TokenReader, Window
from pipeline.machine import resolve_device
from pipeline.stage import UserError, atomic_output
from trainer.api import LoadedWorldModel
from trainer.runs import newest_decoder

FORMATS = (".png", ".gif", ".mp4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualizeConfig:
    run: Path
    out: Path
    store: Path | None = None
    decoder: Path | None = None
    episode: int | None = None  # episode_index in the decoder's source (default: the first val episode)
    start: int = 0
    horizon: int = 10
    context: int | None = None
    k: int = 4
    seed: int = 0
    scale: int = 2
    device: str = "cpu"  # where the model rolls out (`pipeline.machine.resolve_device`); the decoder runs on the CPU

    def __post_init__(self) -> None:
        if Path(self.out).suffix not in FORMATS:
            raise UserError(f"--out {self.out}: the file must end in one of {FORMATS}")


def _label(img: np.ndarray, text: str) -> np.ndarray:
    im = Image.fromarray(img)
    ImageDraw.Draw(im).text((2, 1), text, fill=(255, 0, 0))
    return np.asarray(im)


def _to_uint8(x_3HW: torch.Tensor, scale: int) -> np.ndarray:
    img = (x_3HW.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return img.repeat(scale, 0).repeat(scale, 1)


def write_video(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """H.264 (or MPEG-4 where no H.264 encoder exists) mp4 of RGB frames, with PyAV."""
    h, w = frames[0].shape[:2]
    frames = [f[: h - h % 2, : w - w % 2] for f in frames]
    for codec in ("libx264", "h264", "libopenh264", "mpeg4"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
                for f in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            return
        except (av.error.FFmpegError, ValueError):
            Path(path).unlink(missing_ok=True)
    raise UserError("no usable video encoder in this PyAV build; write a .gif or .png instead")


def run_visualize(cfg: VisualizeConfig, *, on_total: Callable[[int], None] | None = None,
                  on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Decode the rows (see the module doc) and write them to `cfg.out`. Progress in predicted frames: `on_total(n)`
    once the rollouts are known, `on_progress(n)` as each rollout's n frames are decoded."""
    wm = LoadedWorldModel.load(cfg.run, device=str(resolve_device(cfg.device)))
    reader = TokenReader(cfg.store or wm.store)
    decoder_dir = cfg.decoder or newest_decoder()
    decoder, meta = load_decoder(decoder_dir)
    fix = "the run, the decoder and the store must share one encoder"
    check_same_encoder(wm.encoder, reader.encoder, what=wm.name, fix=fix)
    check_same_encoder(meta["encoder"], reader.encoder, what=f"decoder {decoder_dir}", fix=fix)
    eps = reader.episodes
    eps = eps[(eps.source == meta["source"]) & (eps.view == 0)]
    if cfg.episode is not None:
        eps = eps[eps.episode_index == cfg.episode]
        if eps.empty:
            raise UserError(f"episode {cfg.episode} of {meta['source']} is not in {reader.path}")
    else:
        eps = eps.sort_values(["split", "has_actions"], ascending=[False, False])  # val first, labelled first
    row = int(eps.index[0])
    e = reader.episodes.iloc[row]
    wm = wm.for_source(reader, str(e.source))  # its cameras, in the source's order (the decoder's `camera` index)
    fs = wm.cfg.frameskip
    ctx = cfg.context or max(1, wm.window // 2)
    horizon = min(cfg.horizon, (int(e.length) - 1 - cfg.start) // fs - ctx + 1)
    if horizon < 1:
        raise UserError(f"episode {e.episode_index} ({e.length} frames) is too short for {ctx} context frames from "
                        f"frame {cfg.start}")
    T = ctx + horizon
    cam = meta["camera"]
    P = meta["grid"][0] * meta["grid"][1]
    win = reader.read(Window(row, cfg.start, T, fs), ("patch", "state"))
    raw = win["patch"]  # [T, C, P, Z]
    pre = Preprocess.from_dict(reader.encoder["preprocess"])
    truth = preprocess_geometry(episode_frames(reader, row, cam)[cfg.start::fs][:T], pre)
    rows = {"ground truth": truth, "decoded true latents": decoder(normalize_tokens(raw[:, cam], meta))}
    z = wm.normalize(raw, win["state"])[None]  # [1, T, N, Z]
    variants: dict[str, torch.Tensor | None] = {"prediction, null action": None}
    if e.has_actions and wm.shape.action_dim:
        span = (T - 1) * fs + 1
        lo = reader.read(Window(row, cfg.start, span), ("action", "state"))
        steps = wm.action_inputs(np.nan_to_num(lo["action"][: span - 1]), lo["state"][: span - 1])[None]
        variants = {"prediction, with actions": steps, **variants}
    if on_total is not None:
        on_total(horizon * len(variants))
    for name, steps in variants.items():
        pred_raw = _rollout(wm, z[:, :ctx], steps, T, horizon, cfg)[0, :, cam * P:(cam + 1) * P].cpu()
        with torch.no_grad():
            rows[name] = torch.cat([rows["decoded true latents"][:ctx], decoder(normalize_tokens(pred_raw, meta))])
        if on_progress is not None:
            on_progress(horizon)
    return _write(rows, ctx, cfg, frame0=cfg.start, fs=fs, fps=max(2, int(round(10 / fs))))


def _rollout(wm: LoadedWorldModel, context: torch.Tensor, steps: torch.Tensor | None, T: int, horizon: int,
             cfg: VisualizeConfig) -> torch.Tensor:
    """Raw latents [1, horizon, N, Z] rolled out from `context` with the episode's per-step actions `steps`
    (None: the null action)."""
    if steps is not None:
        acts = wm.frame_actions(steps)
        valid = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
        valid[:, 0] = False
    else:
        acts = torch.zeros(1, T, wm.shape.action_dim, device=wm.device)
        valid = torch.zeros(1, T, dtype=torch.bool, device=wm.device)
    pred = wm.rollout(context, acts, horizon=horizon, valid_BT=valid, k=cfg.k,
                      generator=torch.Generator().manual_seed(cfg.seed))
    return wm.denormalize(pred)


def _write(rows: dict[str, torch.Tensor], ctx: int, cfg: VisualizeConfig, *, frame0: int, fs: int, fps: int
           ) -> dict[str, Any]:
    names = list(rows)
    T = len(rows[names[0]])
    tiles = {n: [_to_uint8(rows[n][t], cfg.scale) for t in range(T)] for n in names}
    tags = [f"f{frame0 + t * fs}{' ctx' if t < ctx else ''}" for t in range(T)]
    out = Path(cfg.out)
    with atomic_output(out) as tmp:  # the file whole or not at all (a full disk leaves no torn image behind)
        _draw(tiles, names, tags, tmp, fps)
    return {"out": str(out), "rows": names, "frames": T, "context": ctx}


def _draw(tiles: dict[str, list[np.ndarray]], names: list[str], tags: list[str], out: Path, fps: int) -> None:
    T = len(tags)
    h, w = tiles[names[0]][0].shape[:2]
    if out.suffix == ".png":
        canvas = np.full((len(names) * (h + 14) + 2, T * (w + 2) + 150, 3), 255, dtype=np.uint8)
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for r, n in enumerate(names):
            draw.text((4, r * (h + 14) + 14 + h // 2), n, fill=(0, 0, 0))
            for t in range(T):
                x, y = 150 + t * (w + 2), r * (h + 14) + 14
                img.paste(Image.fromarray(tiles[n][t]), (x, y))
                if r == 0:
                    draw.text((x + 2, y - 12), tags[t], fill=(0, 0, 0))
        img.save(out)
    else:
        frames = []
        for t in range(T):
            panels = [_label(tiles[n][t], f"{n[:24]} {tags[t]}") for n in names]
            frames.append(np.concatenate([np.pad(p, ((0, 0), (0, 2), (0, 0)), constant_values=255) for p in panels],
                                         axis=1))
        if out.suffix == ".gif":
            Image.fromarray(frames[0]).save(out, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]],
                                            duration=int(1000 / fps), loop=0)
        else:
            write_video(frames, out, fps)
