"""Data loss and path safety, through the real commands: `--force` replaces only what wmctl wrote (a dataset, a
manifest, a token store), never the working directory; names and paths read from shared files (a manifest's source,
camera keys, video and data files; a dataset's info.json) stay inside their roots or are refused with exit 2; a video
changed after ingest is refused by name; the leftovers of killed runs are removed by the next run.

Each test fails on the code before this round (79c8cab) and passes now; they use only what both have (the CLI,
`read_manifest`, `run_encode`), so they can be run against either."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner

from featurestore.encode import EncodeConfig, run_encode
from featurestore.encoders import Preprocess, init_random_dinov3
from featurestore.store import StoreLayout, TokenStore
from pipeline.cli import app
from pipeline.demodata import MARKER
from pipeline.manifest import MANIFEST_META_KEY, read_manifest
from pipeline.stage import UserError, owner_tag

runner = CliRunner()
def data_args(out: object, *extra: object, episodes: int = 1) -> list[object]:
    return ["data", "pusht", "--out", out, "--episodes", episodes, "--frames-per-episode", 4, "--size", 64, *extra]


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def run_process(args: list[object], fault: str | None = None) -> subprocess.CompletedProcess:
    """`wmctl ARGS` as a real process; `fault` kills it at that point (`WMCTL_FAULT`, see pipeline.stage)."""
    env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
    if fault:
        env["WMCTL_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env, capture_output=True,
                          text=True)


def encode_args(manifest: Path, store: Path, encoder: Path, *extra: object) -> list[object]:
    return ["encode", "--manifest", manifest, "--store", store, "--encoder", encoder, "--image-size", "64",
            "--batch-size", "16", "--threads", "1", *extra]


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (links not followed) with a file's bytes: what a run must leave as it was."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def rewrite_manifest(src: Path, dst: Path, meta_edit=None, **columns: object) -> Path:
    """A copy of manifest `src` with `columns` set to one value in every row (its metadata edited by `meta_edit`)."""
    table = pq.read_table(src)
    for name, value in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array([value] * len(table), table.schema.field(i).type))
    if meta_edit is not None:
        meta = json.loads(table.schema.metadata[MANIFEST_META_KEY])
        meta_edit(meta)
        table = table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, dst)
    return dst


# ------------------------------------------------------------------------------------------- 1. data --force
def test_data_force_never_deletes_a_folder_wmctl_did_not_write(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not a dataset")
    for force in ([], ["--force"]):
        r = cli(*data_args(foreign, *force))
        assert r.exit_code == 2, r.output
        assert str(foreign) in r.output and "choose another --out" in r.output
        assert "--force" not in r.output  # forcing would delete someone's folder: never the advice
    assert listing(tmp_path) == {"photos": None, "photos/holiday.jpg": b"not a dataset"}


def test_data_force_never_replaces_the_working_directory_or_its_ancestors(tmp_path, monkeypatch):
    work = tmp_path / "work"  # even one that looks like a dataset wmctl wrote
    (work / "meta").mkdir(parents=True)
    (work / MARKER).write_text("{}")
    (work / "notes.txt").write_text("mine")
    (work / "sub").mkdir()
    before = listing(tmp_path)
    monkeypatch.chdir(work)
    r = cli(*data_args(".", "--force"))
    assert r.exit_code == 2 and "working directory" in r.output and "choose another --out" in r.output, r.output
    monkeypatch.chdir(work / "sub")
    r = cli(*data_args("..", "--force"))
    assert r.exit_code == 2 and "working directory" in r.output, r.output
    assert listing(tmp_path) == before


def test_data_force_replaces_its_own_dataset_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "ds"
    assert cli(*data_args(out)).exit_code == 0
    r = cli(*data_args(out, "--seed", 1))
    assert r.exit_code == 2 and "--force" in r.output  # wmctl's own dataset, other settings: forcing is the fix
    r = cli(*data_args(out, "--seed", 1, "--force"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / MARKER).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ------------------------------------------------------------------------------------------- 15. leftovers
def test_a_killed_data_run_leaves_staging_that_the_next_run_removes_but_not_a_live_writers(tmp_path):
    out = tmp_path / "ds"
    killed = run_process(data_args(out, episodes=2), fault="data-episode")
    assert killed.returncode == -9, killed.stderr[-2000:]
    debris = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.staging.")]
    assert len(debris) == 1 and not out.exists()
    live = tmp_path / f".ds.staging.{owner_tag()}"  # a writer that still runs (this test's process)
    live.mkdir()
    r = cli(*data_args(out, episodes=2))
    assert r.exit_code == 0, r.output
    assert (out / MARKER).is_file() and not debris[0].exists() and live.is_dir()


def test_ingest_killed_after_its_commit_leaves_parts_that_the_next_run_removes(pusht_root, tmp_path):
    manifest = tmp_path / "m.parquet"
    parts = tmp_path / "m.parquet.parts"
    killed = run_process(["ingest", "--root", pusht_root, "--out", manifest], fault="ingest-merged")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert manifest.is_file() and parts.is_dir()
    r = cli("ingest", "--root", pusht_root, "--out", manifest)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    assert not parts.exists()


def test_ingest_force_never_deletes_a_file_that_is_not_a_manifest(pusht_root, tmp_path):
    notes = tmp_path / "notes.parquet"
    notes.write_text("my notes, not a manifest")
    r = cli("ingest", "--root", pusht_root, "--out", notes, "--force")
    assert r.exit_code == 2 and str(notes) in r.output and "choose another --out" in r.output, r.output
    assert notes.read_text() == "my notes, not a manifest"


# ------------------------------------------------------------------------------------------- 2. path safety
def test_a_manifest_source_that_climbs_out_of_the_store_is_refused(pusht_manifest, tiny_encoder, tmp_path):
    """`source = "../../victim"` made encode write segments beside the store, and --force (which the mismatch
    message suggests) delete that folder."""
    victim = tmp_path / "victim"  # what store/sources/../../victim names
    zarr.open_group(victim, mode="w", attributes={"wmctl_source": {"repo_id": "someone/else"}})
    (victim / "precious.txt").write_text("keep me")
    bad = rewrite_manifest(pusht_manifest, tmp_path / "bad.parquet", source="../../victim")
    store = tmp_path / "s.zarr"
    before = listing(tmp_path)
    for force in ([], ["--force"]):
        r = cli(*encode_args(bad, store, tiny_encoder, *force))
        assert r.exit_code == 2, r.output
        assert "'../../victim'" in r.output and str(bad) in r.output and "wmctl ingest --force" in r.output
    assert listing(tmp_path) == before


@pytest.mark.parametrize("column, value", [
    ("source", ".."), ("source", "a/b"), ("source", ""), ("source", "caf\u00e9"),
    ("camera_keys", ["../../x"]), ("camera_keys", ["observation images"]),
    ("video_files", ["../../../outside.mp4"]), ("video_files", ["/etc/passwd"]),
    ("data_file", "../data.parquet"), ("data_file", "/etc/passwd"), ("data_file", "data/x\x00.parquet"),
])
def test_manifest_values_that_leave_their_root_are_refused_naming_the_manifest(pusht_manifest, tmp_path, column,
                                                                              value):
    bad = rewrite_manifest(pusht_manifest, tmp_path / "bad.parquet", **{column: value})
    with pytest.raises(UserError, match="re-run `wmctl ingest --force`") as e:
        read_manifest(bad)
    assert str(bad) in str(e.value)


def test_camera_keys_with_dots_stay_valid(multicam_manifest):
    df, _ = read_manifest(multicam_manifest)
    assert "observation.images.wrist_left" in set(df.iloc[0].camera_keys)


def _fake_manifest(path: Path, root: Path, video: str, data: str = "data/chunk-000/file-000.parquet") -> Path:
    row = {"source": "ds", "repo_id": "local/ds", "root": str(root), "episode_index": 0, "length": 3, "fps": 10.0,
           "task": "t", "split": "train", "split_group": "", "has_actions": True, "action_dim": 2, "state_dim": 2,
           "camera_keys": ["observation.image"], "video_files": [video], "from_ts": [0.0], "to_ts": [0.3],
           "data_file": data, "status": "ok", "reason": ""}
    from pipeline.manifest import MANIFEST_SCHEMA

    table = pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA)
    pq.write_table(table.replace_schema_metadata({MANIFEST_META_KEY: json.dumps({"config": {}}).encode()}), path)
    return path


def test_manifest_paths_are_confined_by_name_and_links_inside_a_dataset_are_its_own(tmp_path):
    """A manifest can only name files under its dataset root (no `..`, nothing absolute); a link the dataset's owner
    put inside the dataset (videos on another disk, a Hugging Face snapshot's links into its blobs) is followed."""
    other_disk = tmp_path / "other-disk"
    other_disk.mkdir()
    root = tmp_path / "ds"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "real").symlink_to(other_disk, target_is_directory=True)
    read_manifest(_fake_manifest(tmp_path / "a.parquet", root, "videos/real/file-000.mp4"))
    for bad in ("../other-disk/file-000.mp4", "videos/../../other-disk/file-000.mp4", str(other_disk / "f.mp4")):
        with pytest.raises(UserError, match="not a relative path|not a safe name"):
            read_manifest(_fake_manifest(tmp_path / "b.parquet", root, bad))


def test_ingest_refuses_a_source_or_repo_id_that_is_not_a_safe_name(pusht_root, copy_dataset, tmp_path):
    root = copy_dataset(pusht_root, "pusht donn\u00e9es")
    r = cli("ingest", "--root", root, "--out", tmp_path / "m.parquet")
    assert r.exit_code == 2 and "'pusht donn\u00e9es'" in r.output and "registry" in r.output, r.output
    r = cli("ingest", "--root", pusht_root, "--repo-id", "../../x", "--out", tmp_path / "m.parquet")
    assert r.exit_code == 2 and "'../../x'" in r.output and "--repo-id" in r.output, r.output
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda info: info["features"].__setitem__("../../evil", info["features"].pop("observation.image")),
     "camera key"),
    (lambda info: info.__setitem__("video_path", "../../outside/{video_key}/file-{file_index:03d}.mp4"),
     "video_path"),
    (lambda info: info.__setitem__("data_path", "/tmp/data-{chunk_index}-{file_index}.parquet"), "data_path"),
])
def test_ingest_refuses_dataset_metadata_that_points_outside_the_root(pusht_root, copy_dataset, tmp_path, edit,
                                                                      expected):
    root = copy_dataset(pusht_root, "pusht")
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    r = cli("ingest", "--root", root, "--out", tmp_path / "m.parquet")
    assert r.exit_code == 2 and expected in r.output and "info.json" in r.output, r.output


# ------------------------------------------------------------------------------------------- 4. encode --force
def test_encode_force_never_deletes_a_zarr_group_that_is_not_a_token_store(pusht_manifest, tiny_encoder, tmp_path):
    other = tmp_path / "other.zarr"
    group = zarr.open_group(other, mode="w", attributes={"project": "someone else's"})
    group.create_array("data", shape=(3,), dtype="float32")[:] = 7.0
    before = listing(tmp_path)
    r = cli(*encode_args(pusht_manifest, other, tiny_encoder, "--force"))
    assert r.exit_code == 2 and str(other) in r.output and "not a wmctl token store" in r.output, r.output
    assert "choose another --store" in r.output
    assert listing(tmp_path) == before


def _encode_cfg(manifest: Path, store: Path, encoder: Path, **kw) -> EncodeConfig:
    return EncodeConfig(manifest=manifest, store=store, encoder=str(encoder), preprocess=Preprocess(height=64,
                        width=64), layout=kw.pop("layout", StoreLayout(episodes_per_segment=4)), batch_size=16,
                        threads=1, **kw)


def test_encode_force_says_truthfully_why_it_replaces_a_store(pusht_manifest, tiny_encoder, tmp_path, caplog):
    cfg = _encode_cfg(pusht_manifest, tmp_path / "s.zarr", tiny_encoder)
    run_encode(cfg)
    int8 = dataclasses.replace(cfg, layout=StoreLayout(episodes_per_segment=4, dtype="int8"), force=True)
    with caplog.at_level(logging.WARNING, logger="featurestore.encode"):
        run_encode(int8)
    why = [r.getMessage() for r in caplog.records if "--force: deleting" in r.getMessage()]
    assert len(why) == 1 and "another layout" in why[0] and "layout.dtype" in why[0], why
    assert "encoder" not in why[0].split("(", 1)[1]  # the encoder did not change: it must not say so
    assert TokenStore.open_existing(cfg.store).layout.dtype == "int8"
    other = init_random_dinov3(tmp_path / "other-encoder", preset="tiny", seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featurestore.encode"):
        run_encode(dataclasses.replace(int8, encoder=str(other)))
    why = [r.getMessage() for r in caplog.records if "--force: deleting" in r.getMessage()]
    assert len(why) == 1 and "another encoder:" in why[0] and "weights_sha256" in why[0], why
    assert "layout" not in why[0].split("(", 1)[1]


# ------------------------------------------------------------------------------------------- 7. changed videos
def _head_tail_sha(path: Path, mib: int = 1 << 20) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[:mib] + (data[max(mib, len(data) - mib):] if len(data) > mib else b"")).hexdigest()


def test_ingest_records_a_fingerprint_of_every_video_file(pusht_manifest):
    df, meta = read_manifest(pusht_manifest)
    root = Path(df.iloc[0].root)
    files = {f for fs in df.video_files for f in fs}
    fps = meta["video_fingerprints"]
    assert set(fps) == files
    for rel in files:
        st = (root / rel).stat()
        assert fps[rel] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _head_tail_sha(root / rel)}


def test_a_video_replaced_after_ingest_is_refused_by_name(pusht_root, pusht_free_root, tiny_encoder, copy_dataset,
                                                          tmp_path):
    root = copy_dataset(pusht_root, "pusht")
    manifest, store = tmp_path / "m.parquet", tmp_path / "s.zarr"
    assert cli("ingest", "--root", root, "--out", manifest).exit_code == 0
    rel = read_manifest(manifest)[0].iloc[0].video_files[0]
    shutil.copyfile(pusht_free_root / rel, root / rel)  # another recording of the same length
    r = cli(*encode_args(manifest, store, tiny_encoder))
    assert r.exit_code == 2, r.output
    assert f"{root / rel} changed since {manifest} was written: re-run `wmctl ingest --force`" in r.output
    assert not store.exists()
    assert cli("ingest", "--root", root, "--out", manifest, "--force").exit_code == 0
    os.utime(root / rel, ns=(1, 1))  # touched (copied without its times): the same bytes still encode
    r = cli(*encode_args(manifest, store, tiny_encoder))
    assert r.exit_code == 0, r.output


def test_a_manifest_from_before_fingerprints_encodes_and_warns_once(pusht_manifest, tiny_encoder, tmp_path, caplog):
    old = rewrite_manifest(pusht_manifest, tmp_path / "old.parquet", meta_edit=lambda m: m.pop("video_fingerprints",
                                                                                                 None))
    cfg = _encode_cfg(old, tmp_path / "s.zarr", tiny_encoder)
    with caplog.at_level(logging.WARNING):
        assert run_encode(cfg).segments_committed > 0
        assert run_encode(cfg).nothing_to_do
    warned = [r.getMessage() for r in caplog.records if "fingerprint" in r.getMessage()]
    assert len(warned) == 1 and str(old) in warned[0] and "wmctl ingest --force" in warned[0], warned
