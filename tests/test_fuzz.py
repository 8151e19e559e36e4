"""What users write by hand, fuzzed with a seeded generator: each case is a clear UserError or a correct value,
never a traceback. 600 cases per input kind (registry TOML, --set, --image-size/--grid, --shard, --horizons, and the
manifest values that become paths: source names, camera keys, video and data files)."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import pytest

from pipeline.cli.base import hxw, int_list
from pipeline.registry import DatasetSpec, load_spec
from pipeline.stage import ShardSpec, UserError
from trainer.config import TrainConfig, apply_overrides, tiny
from trainer.eval import EvalConfig

CASES = 600
ATOMS = ["", "0", "1", "-1", "3", "0.5", "1e9", "-0.0", "nan", "inf", "true", "false", "none", "x", "a.b", "1/2",
         "4x", "x4", "16x16", "224x400", "(1, 2)", "((0, 4),)", "[1, 2]", "'s'", "1,2", ",", "1,,5", "5,1", "2**10",
         "\u00e9", " ", "\t", "0x10", "1_000", "--", "0/0", "3/2", "-1/4", "1/-4", "a/b", "2/4/8", "1e-3"]


def _text(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(ATOMS)
    return "".join(rng.choice(string.printable[:-5]) for _ in range(rng.randint(0, 8)))


def _check(fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        assert str(e), "a UserError must say what is wrong"
        return None


def _toml_value(rng: random.Random) -> str:
    return rng.choice(['"x"', '"local/x"', "1", "0.3", "-2", "true", "false", '"false"', '"0.3"', '["a", "b"]',
                      "[1, 2]", '"a.b"', "[]", "{ a = 1 }", "1979-05-27", "nan", "inf", '""', '["observation.image"]'])


KEYS = ["repo_id", "root", "cameras", "use_actions", "mix_weight", "val_fraction", "description", "name", "typo",
        "path", "frameskip"]


def test_registry_files(tmp_path):
    rng = random.Random(0)
    kinds = {"ok": 0, "refused": 0}
    for i in range(CASES):
        lines = [f"{rng.choice(KEYS)} = {_toml_value(rng)}" for _ in range(rng.randint(0, 6))]
        if rng.random() < 0.7:
            lines.insert(0, 'repo_id = "local/x"')
        if rng.random() < 0.1:
            lines.append(_text(rng))  # likely not TOML
        path = tmp_path / f"d{i}.toml"
        path.write_text("\n".join(lines) + "\n")
        spec = _check(load_spec, path)
        if spec is None:
            kinds["refused"] += 1
            continue
        kinds["ok"] += 1
        assert isinstance(spec, DatasetSpec) and isinstance(spec.use_actions, bool)
        assert all(isinstance(c, str) for c in spec.cameras) and 0 <= spec.val_fraction < 1
        assert isinstance(spec.mix_weight, (int, float)) and spec.mix_weight >= 0
    assert kinds["ok"] > 20 and kinds["refused"] > 20, kinds


def test_set_overrides():
    rng = random.Random(1)
    keys = ["steps", "lr", "betas", "context_frames", "context_schedule", "proprio", "action_mode", "seed", "store",
            "out", "model.dim", "model.heads", "model.softcap", "model.k_max", "model.kind", "ctx_noise", "typo",
            "model.typo", "model", "tau_max_schedule", "labelled_fraction", "precision", "init_from"]
    ok = 0
    for _ in range(CASES):
        sets = [f"{rng.choice(keys)}={_text(rng)}" if rng.random() < 0.9 else _text(rng)
                for _ in range(rng.randint(1, 3))]
        cfg = _check(apply_overrides, tiny(), sets)
        if cfg is not None:
            ok += 1
            assert isinstance(cfg, TrainConfig)
    assert ok > 20


@pytest.mark.parametrize("option", ["--image-size", "--grid"])
def test_sizes(option):
    rng = random.Random(2)
    for _ in range(CASES):
        text = _text(rng)
        out = _check(hxw, text, option)
        if out is not None:
            h, w = out
            assert isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0, (text, out)


def test_shards():
    rng = random.Random(3)
    for _ in range(CASES):
        text = rng.choice([_text(rng), f"{rng.randint(-3, 9)}/{rng.randint(-3, 9)}"])
        spec = _check(ShardSpec.parse, text)
        if spec is not None:
            assert 0 <= spec.index < spec.count, (text, spec)


def test_horizons(tmp_path):
    rng = random.Random(4)
    for _ in range(CASES):
        text = ",".join(_text(rng) for _ in range(rng.randint(1, 4)))
        horizons = _check(int_list, text)
        if horizons is None:
            continue
        cfg = _check(lambda h: EvalConfig(ckpt=tmp_path, horizons=h), horizons)
        if cfg is not None:
            assert cfg.horizons and min(cfg.horizons) >= 1


# ------------------------------------------------------------------------ manifest values that become paths
NAME_ATOMS = ["pusht", "observation.images.wrist_left", "observation.image", "cam-1", "a=b+c@d", "..", ".", "",
              "../x", "../../sentinel", "/abs", "/etc/passwd", "a/b", "a\\b", "x\x00y", "\u00e9t\u00e9",
              "\u65e5\u672c", "a" * 300, ".hidden", "-dash", " ", "a b", "~", "$HOME", "C:\\x", "x\n", "\u202e",
              "link-out", "link-in", "videos", "file-000.mp4"]
PATH_PARTS = ["videos", "real", "link-in", "link-out", "data", "chunk-000", "file-000.mp4", "file-000.parquet", ".",
              "..", "", "\u00e9", "x\x00", "a" * 255, "b" * 300, " ", "~", "-x"]


def _fuzz_name(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(NAME_ATOMS)
    return "".join(rng.choice(string.printable[:-5] + "\u00e9\u0000/") for _ in range(rng.randint(0, 12)))


def _fuzz_path(rng: random.Random, sentinel: Path) -> str:
    r = rng.random()
    if r < 0.1:
        return str(sentinel / "x.mp4")  # absolute, outside
    if r < 0.2:
        return rng.choice(["videos/real/file-000.mp4", "videos/link-in/file-000.mp4", "link-out/x.mp4",
                           "data/chunk-000/file-000.parquet", "../sentinel/x.mp4", "videos/../../sentinel/x.mp4"])
    path = "/".join(rng.choice(PATH_PARTS) for _ in range(rng.randint(1, 10)))
    return ("/" if rng.random() < 0.1 else "") + path


def _fuzz_root(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset root with a link inside it and a link leading out to a sentinel folder."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "x.mp4").write_bytes(b"not yours")
    root = tmp_path / "root"
    (root / "videos" / "real").mkdir(parents=True)
    (root / "videos" / "link-in").symlink_to(root / "videos" / "real", target_is_directory=True)
    (root / "link-out").symlink_to(sentinel, target_is_directory=True)
    return root, sentinel


def _tree(folder: Path) -> list[tuple[str, bytes | None]]:
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                  for p in folder.rglob("*"))


def _confined(root: Path, rel: str) -> bool:
    """Under `root` by name: relative, no `..`, normalising to a path below root (a link the dataset itself holds,
    like `link-out`, is the dataset owner's and is followed)."""
    norm = os.path.normpath(os.path.join(root, rel))
    return not os.path.isabs(rel) and ".." not in rel.split("/") and norm.startswith(str(root) + os.sep)


def test_manifest_values_that_become_paths(tmp_path):
    """Source names, camera keys, video and data files of a manifest (`..`, absolute paths, unicode, empty, very
    long, NUL): `read_manifest`, which every later stage reads through, returns only values that name paths under
    their roots, and refuses the rest with a UserError; nothing outside is touched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import MANIFEST_META_KEY, MANIFEST_SCHEMA, read_manifest

    root, sentinel = _fuzz_root(tmp_path)
    before = _tree(tmp_path)
    rng = random.Random(5)
    kinds = {"ok": 0, "refused": 0}
    path = tmp_path / "m.parquet"
    meta = {MANIFEST_META_KEY: json.dumps({"config": {}}).encode()}
    for _ in range(CASES):
        row = {"source": "pusht", "repo_id": "local/pusht", "root": str(root), "episode_index": 0, "length": 3,
               "fps": 10.0, "task": "t", "split": "train", "split_group": "", "has_actions": True, "action_dim": 2,
               "state_dim": 2, "camera_keys": ["observation.image"], "video_files": ["videos/real/file-000.mp4"],
               "from_ts": [0.0], "to_ts": [0.3], "data_file": "data/chunk-000/file-000.parquet", "status": "ok",
               "reason": ""}
        for field in rng.sample(["source", "camera_keys", "video_files", "data_file"], rng.choice([1, 1, 1, 2])):
            if field == "source":
                row["source"] = _fuzz_name(rng)
            elif field == "camera_keys":
                row["camera_keys"] = [_fuzz_name(rng) for _ in range(rng.randint(1, 2))]
                row["video_files"] = ["videos/real/file-000.mp4"] * len(row["camera_keys"])
                row["from_ts"], row["to_ts"] = [0.0] * len(row["camera_keys"]), [0.3] * len(row["camera_keys"])
            elif field == "video_files":
                row["video_files"] = [_fuzz_path(rng, sentinel) for _ in row["camera_keys"]]
            else:
                row["data_file"] = _fuzz_path(rng, sentinel)
        pq.write_table(pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA).replace_schema_metadata(meta), path,
                       compression="none", write_statistics=False)
        got = _check(read_manifest, path)
        if got is None:
            kinds["refused"] += 1
            continue
        kinds["ok"] += 1
        df, _ = got
        for name in [df.source[0], *df.camera_keys[0]]:
            assert name not in ("", ".", "..") and not set(name) & {"/", "\\", "\x00"} and len(name) <= 255, row
        for rel in [*df.video_files[0], df.data_file[0]]:
            assert _confined(root, rel), row
    assert kinds["ok"] > 60 and kinds["refused"] > 300, kinds
    path.unlink()
    assert _tree(tmp_path) == before


def test_hostile_manifests_through_wmctl_encode(pusht_manifest, tiny_encoder, tmp_path):
    """A handful through the real `wmctl encode --force`: each refused with exit 2, the folder a value points at
    (a sentinel beside the store) left exactly as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipeline.cli import app

    stores = tmp_path / "stores"
    sentinel = stores / "sentinel"  # what <store>/sources/../../sentinel names
    sentinel.mkdir(parents=True)
    (sentinel / "x.mp4").write_bytes(b"not yours")
    linked = stores / "linked.zarr"
    (linked / "sources").mkdir(parents=True)
    (linked / "sources" / "pusht").symlink_to(sentinel, target_is_directory=True)  # the source's folder leads out
    cases = [("source", "../../sentinel"), ("source", ".."), ("camera_keys", ["../../sentinel"]),
             ("video_files", ["../../../sentinel/x.mp4"]), ("data_file", str(sentinel / "x.parquet")), (None, None)]
    before = _tree(stores)
    for i, (column, value) in enumerate(cases):
        table = pq.read_table(pusht_manifest)
        if column:
            field = table.schema.field(column)
            table = table.set_column(table.schema.get_field_index(column), field,
                                     pa.array([value] * len(table), field.type))
        manifest = tmp_path / f"m{i}.parquet"
        pq.write_table(table, manifest)
        store = linked if column is None else stores / "s.zarr"
        r = CliRunner().invoke(app, ["encode", "--manifest", str(manifest), "--store", str(store), "--encoder",
                                     str(tiny_encoder), "--image-size", "64", "--threads", "1", "--force"])
        assert r.exit_code == 2, (column, value, r.output)
        assert _tree(stores) == before, (column, value)
