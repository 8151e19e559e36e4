"""Frozen image encoders through transformers: DINOv3 (`DINOv3ViTModel`) and DINOv2 (`Dinov2Model`,
`Dinov2WithRegistersModel`), loaded from a local directory or the Hugging Face cache, never with
`trust_remote_code`.

Per frame the encoder returns the CLS token, the register tokens (DINOv3 ViT-B/16 has 4; they are *not*
patches) and the patch tokens on the grid (224x224 -> 14x14x768). Its identity (model id, sha256 of the
weights, architecture config, preprocessing) is what the token store records and compares.

Legend: B = images, H/W = pixels, P = patch tokens (gh*gw), R = register tokens, D = encoder width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from featurestore.provision import KNOWN, damage, provisioned_path, read_provenance
from pipeline.stage import ConfigMismatchError, UserError, apply_umask, config_differences, to_jsonable

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "facebook/dinov3-vitb16-pretrain-lvd1689m"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_MARKER = "wmctl_random_weights.json"  # written by `wmctl encoder init-random`
SUPPORTED_TYPES = ("dinov3_vit", "dinov2", "dinov2_with_registers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocess:
    """DINO preprocessing: resize, (center crop), scale to [0, 1], normalise with mean/std.

    resize: `crop` resizes the shorter side to cover (height, width) and center-crops (aspect kept, the
    sides of wide frames are cut); `squash` resizes to (height, width) directly (the HF processor's
    choice: full field of view, aspect changed). height/width must be multiples of the patch size;
    a non-square size keeps more of a wide camera (e.g. 224x400 -> 14x25 patches).
    """

    height: int = 224
    width: int = 224
    resize: str = "crop"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "squash"):
            raise UserError(f"preprocessing resize={self.resize!r}: choose crop or squash")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise UserError(f"preprocessing interpolation={self.interpolation!r}: choose bilinear or bicubic")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From the `preprocess` entry of an encoder identity (JSON lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def __call__(self, frames_BHWC: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float32 [B, 3, height, width]; `augment` acts on [0, 1] pixels."""
        x_BCHW = frames_BHWC.permute(0, 3, 1, 2).float().div_(255.0)
        if augment is not None:
            x_BCHW = augment(x_BCHW)
        x_BCHW = resize_crop(x_BCHW, self.height, self.width, self.resize, self.interpolation, self.antialias)
        mean = torch.tensor(self.mean, device=x_BCHW.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x_BCHW.device).view(1, 3, 1, 1)
        return (x_BCHW - mean) / std


def resize_crop(x_BCHW: torch.Tensor, height: int, width: int, mode: str = "crop",
                interpolation: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resize (and center-crop when mode == 'crop') a float batch to (height, width)."""
    h, w = x_BCHW.shape[-2:]
    if mode == "squash":
        size = (height, width)
    else:
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x_BCHW = F.interpolate(x_BCHW, size=size, mode=interpolation, antialias=antialias, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return x_BCHW[..., top:top + height, left:left + width]


@runtime_checkable
class Encoder(Protocol):
    """Frames -> tokens. `encode` takes uint8 [B, H, W, 3] and returns cls [B, D], registers [B, R, D],
    patch [B, P, D] (float32, on CPU)."""

    embed_dim: int
    grid: tuple[int, int]

    def identity(self) -> dict[str, Any]: ...

    def encode(self, frames_BHWC: torch.Tensor) -> dict[str, torch.Tensor]: ...


def weights_sha256(model: torch.nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (sorted names, dtypes, shapes, bytes): independent of the file format."""
    h = hashlib.sha256()
    state = model if isinstance(model, dict) else model.state_dict()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def saved_weights_sha256(folder: Path | None) -> str | None:
    """`weights_sha256` of the tensors in a checkpoint folder's safetensors files, under the names they are saved
    with (None: no such files). transformers renames modules between versions (5.x moved DINOv3's layers under
    `model.`) but keeps loading the saved names, so this hash, unlike the loaded model's, survives an upgrade."""
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return weights_sha256(state)


def _processor_settings(path: Path | None) -> dict[str, Any]:
    """Mean/std/resample/size from the model's preprocessor_config.json, where it has one."""
    if path is None or not (path / "preprocessor_config.json").is_file():
        return {}
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    out: dict[str, Any] = {}
    if "image_mean" in cfg:
        out["mean"] = tuple(float(x) for x in cfg["image_mean"])
    if "image_std" in cfg:
        out["std"] = tuple(float(x) for x in cfg["image_std"])
    if cfg.get("resample") == 3:
        out["interpolation"] = "bicubic"
    return out


def resolve_model_path(model: str) -> tuple[str, Path | None]:
    """(the name to record, local directory or None for a Hub id to find in the HF cache). The name follows the
    weights, never where they lie: a provisioned encoder's name (`wmctl encoder fetch`), a random encoder's preset
    and seed, a Hub id, or for any other folder `local:<folder name>`; the weights hash is what identifies them."""
    if model in KNOWN:
        folder = provisioned_path(model)
        if (why := damage(folder)) is not None:
            raise UserError(f"--encoder {model}: not provisioned at {folder} ({why}); run `wmctl encoder fetch` "
                            "(or `make install`) first")
        return model, folder
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"--encoder {model}: {p / 'config.json'} is missing (expected a save_pretrained folder)")
        return local_model_id(p), p
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise UserError(f"--encoder {model}: no such directory, not a Hugging Face model id, and not one of the "
                        f"encoders `wmctl encoder fetch` provisions ({', '.join(sorted(KNOWN))})")
    return model, None


def local_model_id(folder: Path) -> str:
    """The recorded name of a local encoder folder (see `resolve_model_path`)."""
    if (prov := read_provenance(folder)) and prov.get("encoder"):
        return str(prov["encoder"])
    marker = folder / RANDOM_MARKER
    if marker.is_file():
        try:
            m = json.loads(marker.read_text())
            return f"random-dinov3-{m['preset']}-seed{m['seed']}"
        except (ValueError, KeyError, TypeError):
            pass
    return f"local:{folder.resolve().name}"


# Fields of an identity that name or describe an encoder without being part of what it computes: two identities
# that agree on everything else (weights hash, architecture, preprocessing, grid) are the same encoder.
IDENTITY_LABELS = ("model_id", "description")


def identity_key(identity: dict[str, Any]) -> dict[str, Any]:
    """What two encoder identities must share to be the same encoder: all but the labels."""
    return {k: v for k, v in to_jsonable(identity).items() if k not in IDENTITY_LABELS}


class HFDinoEncoder:
    """A frozen DINOv3/DINOv2 from transformers, in eval + inference mode; bf16 autocast on CUDA."""

    def __init__(self, model: str = DEFAULT_ENCODER, *, preprocess: Preprocess | None = None,
                 device: str = "cpu", autocast: bool = True):
        from transformers import AutoConfig, AutoModel

        self.model_id, local = resolve_model_path(model)
        try:
            config = AutoConfig.from_pretrained(local or model, trust_remote_code=False)
            if config.model_type not in SUPPORTED_TYPES:
                raise UserError(f"--encoder {model}: model_type {config.model_type!r} is not supported; "
                                f"use a DINOv3 or DINOv2 checkpoint ({', '.join(SUPPORTED_TYPES)})")
            self.model = AutoModel.from_pretrained(local or model, trust_remote_code=False)
        except OSError as e:
            raise UserError(
                f"cannot load encoder {model!r}: {str(e).splitlines()[0]}. Pretrained weights are read from a local "
                "directory or the Hugging Face cache (download once with `huggingface-cli download "
                f"{DEFAULT_ENCODER}` on a machine with internet); for a test set-up use "
                "`wmctl encoder init-random --out DIR`."
            ) from None
        if local is None:
            from huggingface_hub import snapshot_download

            try:
                local = Path(snapshot_download(model, local_files_only=True))
            except Exception:  # noqa: BLE001 - settings only, the weights are loaded
                local = None
        self.random_weights = bool(local and (local / RANDOM_MARKER).exists())
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.autocast = autocast and self.device.type == "cuda"
        cfg = self.model.config
        self.model_type = cfg.model_type
        self.patch_size = int(cfg.patch_size)
        self.embed_dim = int(cfg.hidden_size)
        self.num_registers = int(getattr(cfg, "num_register_tokens", 0) or 0)
        base = Preprocess(**_processor_settings(local))
        self.preprocess = preprocess or base
        if self.preprocess.height % self.patch_size or self.preprocess.width % self.patch_size:
            raise UserError(f"image size {self.preprocess.height}x{self.preprocess.width} is not a multiple of the "
                            f"patch size {self.patch_size}")
        self.grid = (self.preprocess.height // self.patch_size, self.preprocess.width // self.patch_size)
        # the identity's hash: of the checkpoint as saved (stable across transformers versions); the loaded
        # model's hash under its module names (what stores and runs made before recorded) only when asked for
        self._sha = saved_weights_sha256(local) or weights_sha256(self.model)
        self._hashes: frozenset[str] | None = None
        self.location = str(local.resolve()) if local is not None else None  # where it was loaded from (a hint)
        self.description = (read_provenance(local) or {}).get("description") if local is not None else None
        if self.random_weights:
            log.warning("encoder %s has RANDOM weights (made by `wmctl encoder init-random`): tokens are not "
                        "DINO features; results only exercise the pipeline", self.model_id)

    def weights_hashes(self) -> frozenset[str]:
        """The hashes that name these weights: as saved (the identity's), and the loaded model's state dict under
        the installed transformers' module names (what wmctl recorded before the saved hash; computed once, on the
        first ask: it reads every weight)."""
        if self._hashes is None:
            self._hashes = frozenset({self._sha, weights_sha256(self.model)})
        return self._hashes

    def identity(self, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """What tokens made by this encoder record. With `recorded` (an identity a store or run holds): its
        weights hash where that names these very weights (`weights_hashes()`: as saved, or as an older wmctl
        hashed the loaded model), so the two compare equal on everything else."""
        cfg = self.model.config.to_dict()
        sha = self._sha
        if recorded is not None and recorded.get("weights_sha256") not in (None, sha) and \
                recorded["weights_sha256"] in self.weights_hashes():
            sha = recorded["weights_sha256"]
        labels = {"description": self.description} if self.description else {}
        arch = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "patch_size", "num_register_tokens", "layer_norm_eps",
                                         "use_gated_mlp", "rope_theta") if k in cfg}
        mine = {
            "model_id": self.model_id,
            "weights_sha256": sha,
            "random_weights": self.random_weights,
            "architecture": arch,
            "preprocess": dataclasses.asdict(self.preprocess),
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "dim": self.embed_dim,
            "num_register_tokens": self.num_registers,
            "output": "last_hidden_state (final norm): [CLS | registers | patches]",
            **labels,
        }
        if recorded is not None and identity_key(recorded) == identity_key(mine):
            return dict(recorded)  # the same encoder under the name it was recorded with (e.g. an older path)
        return mine

    @torch.inference_mode()
    def forward_preprocessed(self, pixels_B3HW: torch.Tensor, dtype: torch.dtype = torch.float32
                             ) -> dict[str, torch.Tensor]:
        """Normalised pixels [B, 3, H, W] -> cls [B, D], registers [B, R, D], patch [B, P, D] on the CPU, in
        `dtype` (converted on the device: float16, the store's dtype, halves the copy back from a GPU)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            hidden_BND = self.model(pixel_values=pixels_B3HW.to(self.device)).last_hidden_state
        hidden_BND = hidden_BND.to(dtype).cpu()
        r = self.num_registers
        return {"cls": hidden_BND[:, 0], "registers": hidden_BND[:, 1:1 + r], "patch": hidden_BND[:, 1 + r:]}

    def encode(self, frames_BHWC: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_preprocessed(self.preprocess(frames_BHWC.to(self.device)))


def check_same_encoder(expected: dict[str, Any], found: dict[str, Any], *, what: str, fix: str) -> None:
    """The one check that tokens, weights and a trained model share an encoder: `expected` is the identity `what`
    (a run, a decoder, a store) was made with, `found` the one at hand. Compared on everything but the labels
    (`identity_key`: the same weights in another folder or clone are the same encoder). Refused naming every
    differing field."""
    a, b = identity_key(expected), identity_key(found)
    if a != b:
        raise ConfigMismatchError(f"the encoder of {what}", config_differences(a, b), fix)


def encoder_for(identity: dict[str, Any], device: str = "cpu", *, hints: tuple[str | Path | None, ...] = ()
                ) -> HFDinoEncoder:
    """The encoder an identity names (its weights and preprocessing), checked to be that very encoder. Looked for in
    `hints` first (a folder the user named, where the store was encoded from), then under its recorded name (a
    provisioned encoder, a Hub id in the HF cache, or the folder an older wmctl recorded)."""
    preprocess = Preprocess.from_dict(identity["preprocess"])
    tried: list[str] = []
    mismatch: ConfigMismatchError | None = None
    for cand in [*(str(h) for h in hints if h), str(identity["model_id"])]:
        if cand in tried or cand.startswith(("local:", "random-dinov3-")):
            continue  # a label, not a place
        tried.append(cand)
        try:
            enc = HFDinoEncoder(cand, preprocess=preprocess, device=device)
            check_same_encoder(identity, enc.identity(identity), what=cand,
                               fix="the weights there changed; pass the encoder the tokens were made with as --encoder")
            return enc
        except ConfigMismatchError as e:
            mismatch = e
        except UserError:
            continue
    if mismatch is not None:
        raise mismatch
    raise UserError(f"cannot find the encoder {identity['model_id']!r} (weights sha256 "
                    f"{str(identity.get('weights_sha256'))[:12]}) the tokens were made with (looked in: "
                    f"{', '.join(tried) or 'nowhere'}); pass its folder with --encoder")


TINY_ARCH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VITB16_ARCH = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   layerscale_value=1e-5)
RANDOM_PRESETS = {"tiny": TINY_ARCH, "vitb16": VITB16_ARCH}


def init_random_dinov3(out: Path, *, preset: str = "tiny", seed: int = 0, image_size: int = 224) -> Path:
    """Save a randomly initialised DINOv3 (4 registers, patch 16) with save_pretrained, marked as random."""
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessorFast, DINOv3ViTModel

    if preset not in RANDOM_PRESETS:
        raise UserError(f"--preset {preset!r}: choose one of {sorted(RANDOM_PRESETS)}")
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, image_size=image_size, **RANDOM_PRESETS[preset])
    model = DINOv3ViTModel(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    DINOv3ViTImageProcessorFast(size={"height": image_size, "width": image_size}).save_pretrained(out)
    (out / RANDOM_MARKER).write_text(json.dumps({
        "preset": preset, "seed": seed,
        "note": "random weights for tests and demos; not DINOv3 features",
    }, indent=2) + "\n")
    apply_umask(out, tree=True)  # save_pretrained's safetensors are 0600
    return out
