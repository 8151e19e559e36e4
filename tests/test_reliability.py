"""Damage is detected, a half-created store is finished, bad input is refused: the store's promises as tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from synthetic import write_token_world
from typer.testing import CliRunner

from featurestore.reader import DamagedStoreError, TokenReader, Window
from featurestore.status import verify_store
from featurestore.store import StoreLayout, TokenStore
from pipeline.cli import app
from pipeline.stage import UserError


def _patch_shard(store: Path, source: str = "world") -> Path:
    seg = next((store / "sources" / source / "segments").glob("v*"))
    return next(p for p in (seg / "patch" / "c").rglob("*") if p.is_file())


def _flip(path: Path, offset: int = 1000, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_inside_a_chunk_are_detected_on_read_and_by_verify(tmp_path):
    store = write_token_world(tmp_path / "w.zarr")
    clean = TokenReader(store).read(Window(0, 0, 4))["patch"]
    _flip(_patch_shard(store))  # one bit pattern inside the first chunk: without a checksum it decodes to
    # plausible finite numbers (checked when this test was written), the shard index at the end stays intact
    with pytest.raises(DamagedStoreError, match=r"segment world/v0-b000000 is damaged.*--repair"):
        TokenReader(store).read(Window(0, 0, 4))
    (d,) = verify_store(store)
    assert d["segment"] == "v0-b000000" and "patch" in d["problem"] and d["episodes"][0] == 0
    r = CliRunner().invoke(app, ["status", "--store", str(store), "--verify"])
    assert r.exit_code == 1 and "damaged: world/v0-b000000" in r.output
    # a store that reads back whole verifies clean, and the checksums cost nothing in what is read
    other = write_token_world(tmp_path / "w2.zarr")
    assert verify_store(other) == []
    np.testing.assert_array_equal(TokenReader(other).read(Window(0, 0, 4))["patch"], clean)


def test_a_truncated_shard_names_its_segment(tmp_path):
    store = write_token_world(tmp_path / "w.zarr")
    shard = _patch_shard(store)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DamagedStoreError, match="world/v0-b000000"):
        TokenReader(store).read(Window(0, 0, 4))
    assert verify_store(store)[0]["segment"] == "v0-b000000"


def test_checksummed_store_opens_with_plain_zarr_and_dask(tmp_path):
    import dask.array as da

    store = write_token_world(tmp_path / "w.zarr")
    seg = store / "sources" / "world" / "segments" / "v0-b000000"
    codecs = [type(c).__name__ for c in zarr.open_array(seg / "patch", mode="r").metadata.codecs[0].codecs]
    assert "Crc32cCodec" in codecs
    root = zarr.open_group(store, mode="r")
    patch = root["sources"]["world"]["segments"]["v0-b000000"]["patch"]
    np.testing.assert_array_equal(da.from_zarr(patch)[:4].compute(), patch[:4])


def test_a_store_or_source_whose_creator_was_killed_is_finished_by_the_next_writer(tmp_path):
    store = write_token_world(tmp_path / "w.zarr")
    ts = TokenStore.open_existing(store)
    prov = ts.source_attrs("world")
    for sub in ("segments", "staging", "failed"):  # killed right after sources/world/zarr.json
        shutil.rmtree(ts.source_dir("world") / sub)
    ts.ensure_source("world", prov, fixed_keys=())
    for sub in ("segments", "staging", "failed"):
        assert (ts.source_dir("world") / sub / "zarr.json").is_file()
    (store / "sources" / "zarr.json").unlink()  # killed right after the root's zarr.json
    TokenStore.create_or_open(store, ts.encoder, StoreLayout(**ts.attrs["layout"]))
    assert "world" in zarr.open_group(store, mode="r")["sources"]


def test_encode_repair_re_encodes_exactly_the_damaged_segments(tmp_path, pusht_manifest, tiny_encoder):
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess

    store = tmp_path / "s.zarr"
    cfg = EncodeConfig(manifest=pusht_manifest, store=store, encoder=str(tiny_encoder),
                       preprocess=Preprocess(height=64, width=64), layout=StoreLayout(episodes_per_segment=2),
                       batch_size=16, threads=1)
    run_encode(cfg)
    segs = sorted((store / "sources" / "pusht" / "segments").glob("v*"))
    before = {s.name: (s / "patch" / "zarr.json").stat().st_mtime_ns for s in segs}
    want = TokenReader(store).episode(0, ("patch",))["patch"]
    _flip(_patch_shard(store, "pusht"))
    assert run_encode(cfg).nothing_to_do  # without --repair nothing is redone ...
    (damaged,) = verify_store(store)
    import dataclasses

    res = run_encode(dataclasses.replace(cfg, repair=True))  # ... with it, exactly that segment
    assert res.segments_committed == 1 and verify_store(store) == []
    after = {s.name: (s / "patch" / "zarr.json").stat().st_mtime_ns for s in
             (store / "sources" / "pusht" / "segments").glob("v*")}
    assert {k for k in before if after[k] != before[k]} == {damaged["segment"]}
    np.testing.assert_array_equal(TokenReader(store).episode(0, ("patch",))["patch"], want)


def test_an_ingest_shard_that_owns_no_block_finishes_cleanly(pusht_root, tmp_path):
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["ingest", "--root", str(pusht_root), "--out", str(out), "--shard", "5/8"])
    assert r.exit_code == 0, r.output
    assert "shard 5/8: 0 block(s) done" in r.output and not out.exists()
    r = CliRunner().invoke(app, ["ingest", "--root", str(pusht_root), "--out", str(out), "--shard", "0/8"])
    assert r.exit_code == 0 and out.exists()  # the shard that owns the one block writes the manifest


def _train(*args):
    return CliRunner().invoke(app, ["train", *args])


def test_resume_needs_only_the_run_folder_and_refuses_a_different_config(tmp_path):
    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    r = _train("--store", str(store), "--preset", "tiny", "--out", str(run), "--steps", "4", "--set",
               "context_frames=6")
    assert r.exit_code == 0, r.output
    r = _train("--out", str(run), "--resume", "--steps", "6")  # what the README and the SLURM script run
    assert r.exit_code == 0, r.output
    assert "step 6" in r.output
    r = _train("--out", str(run), "--resume", "--preset", "small", "--steps", "8")
    assert r.exit_code == 2 and "context_frames" in r.output and "--out RUN --resume" in r.output
    r = _train("--out", str(run), "--resume", "--steps", "8", "--lr", "0.5")
    assert r.exit_code == 2 and "lr: 0.001 -> 0.5" in r.output
    r = _train("--store", str(store), "--preset", "tiny", "--out", str(run), "--resume", "--steps", "7", "--set",
               "context_frames=6")  # the whole original command still resumes
    assert r.exit_code == 0, r.output


def test_a_damaged_checkpoint_is_named_never_unpickled(tmp_path):
    import pickle

    store, run = write_token_world(tmp_path / "w.zarr"), tmp_path / "run"
    assert _train("--store", str(store), "--preset", "tiny", "--out", str(run), "--steps", "3").exit_code == 0
    ckpt = next((run / "checkpoints").glob("step-*"))

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "EXECUTED",))

    (ckpt / "optim.pt").write_bytes(pickle.dumps({"optimizer": Boom()}))
    r = _train("--out", str(run), "--resume", "--steps", "5")
    assert r.exit_code == 2 and "optim.pt cannot be read" in r.output and "damaged" in r.output
    assert "weights_only=False" not in r.output and not (tmp_path / "EXECUTED").exists()
    (ckpt / "model.safetensors").write_bytes(pickle.dumps([1, 2, 3]))
    r = _train("--out", str(run), "--resume", "--steps", "5")
    assert r.exit_code == 2 and "model.safetensors cannot be read" in r.output


def test_eval_never_drops_a_condition_silently(tmp_path):
    from trainer.eval import EvalConfig, run_eval

    store = write_token_world(tmp_path / "w.zarr", source="lab", length=12)  # short labelled episodes
    write_token_world(store, source="free", length=40, labelled=False, seed=1)
    run = tmp_path / "run"
    assert _train("--store", str(store), "--preset", "tiny", "--out", str(run), "--steps", "2",
                  "--set", "labelled_fraction=0.5").exit_code == 0
    with pytest.raises(UserError, match=r"longest labelled .* val episode has 12: lower --horizons to <= 10"):
        run_eval(EvalConfig(ckpt=run, horizons=(1, 5, 30), context=2, probe=False, plots=False, out=tmp_path / "e"))
    res = run_eval(EvalConfig(ckpt=run, horizons=(1, 5, 10), context=2, probe=False, plots=False, out=tmp_path / "e"))
    assert set(res.conditions) == {"actions", "null_action", "action_free"}


def _dead_tag() -> str:
    import socket
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}.{int(p.stdout)}.deadbeef"


def test_one_rule_for_leftovers_staging_of_other_hosts_and_killed_checkpoint_writes(tmp_path):
    import os
    import time

    from featurestore.status import store_status

    store = write_token_world(tmp_path / "w.zarr")
    staging = store / "sources" / "world" / "staging"
    old = staging / "v0-b000007-aaaa.other-node.4242.0123abcd"  # a requeued SLURM job's debris on another node
    live = staging / "v0-b000008-bbbb.other-node.4343.0123abcd"  # another node writing right now
    for p in (old, live):
        (p / "patch").mkdir(parents=True)
        (p / "patch" / "c").write_bytes(b"x")
    for f in [old, old / "patch", old / "patch" / "c"]:
        os.utime(f, (time.time() - 7 * 3600,) * 2)
    (s,) = store_status(store)["sources"]
    assert (s["in_progress"], s["stale"]) == (1, 1)
    assert TokenStore.open_existing(store).clean_stale_staging("world") == 1
    assert live.exists() and not old.exists()

    run = tmp_path / "run"
    assert _train("--store", str(store), "--preset", "tiny", "--out", str(run), "--steps", "2").exit_code == 0
    debris = run / "checkpoints" / f".step-00000003.{_dead_tag()}"
    (debris / "model.safetensors").parent.mkdir(parents=True)
    (debris / "model.safetensors").write_bytes(b"half a checkpoint")
    assert _train("--out", str(run), "--resume", "--steps", "4").exit_code == 0
    assert not debris.exists() and (run / "checkpoints" / "step-00000004").is_dir()


def test_encode_shard_owning_nothing_says_so(tmp_path, pusht_manifest, tiny_encoder):
    r = CliRunner().invoke(app, ["encode", "--manifest", str(pusht_manifest), "--store", str(tmp_path / "s.zarr"),
                                 "--encoder", str(tiny_encoder), "--image-size", "64", "--shard", "1/2"])
    assert r.exit_code == 0, r.output
    assert "shard 1/2: it owns none of the 1 pending segment(s)" in r.output


def test_a_redone_segment_does_not_count_its_frames_twice(monkeypatch):
    import featurestore.encode_segment as enc

    calls = []

    def fake_encode_one(store, encoder, src, plan, cfg, on_frames=None):
        on_frames(sum(int(e["length"]) for e in plan.episodes))
        if len(calls) == 0:
            calls.append(1)
            raise enc.EpisodeFailed(1, "bad video")
        return True

    class Store:
        def record_failure(self, *a):
            pass

    monkeypatch.setattr(enc, "encode_one", fake_encode_one)
    plan = enc.SegmentPlan("s", 0, 0, ({"episode_index": 0, "length": 10}, {"episode_index": 1, "length": 5}))
    src = enc.SourceInfo("s", Path("."), 10.0, ["c"], [0], 2, 2)
    seen = []
    out = enc.encode_segment(Store(), None, src, plan, None, on_frames=seen.append)
    assert out["committed"] and sum(seen) == 10 == out["frames"]  # the progress ends at what was committed


def test_writing_a_dataset_does_not_flood_stderr_with_the_encoder_log(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SVT_LOG"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "pusht", "--out", str(tmp_path / "d"),
                        "--episodes", "1", "--frames-per-episode", "8"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Svt[info]" not in r.stderr and len(r.stderr.splitlines()) < 40


def test_a_finished_run_is_reused_only_for_the_same_steps_and_recipe(tiny_run, pusht_store, tmp_path):
    """`finished_as`: what the study scripts ask before training a variant again."""
    import dataclasses

    from trainer.config import tiny
    from trainer.runs import finished_as

    cfg = dataclasses.replace(tiny(), store=pusht_store, out=tiny_run, steps=30, labelled_fraction=0.5,
                              action_mode="relative_to_state", context_frames=6)  # as conftest trained it
    assert finished_as(tiny_run, cfg)
    assert finished_as(tiny_run, dataclasses.replace(cfg, out=tmp_path / "elsewhere", tracker="none"))  # bookkeeping
    assert not finished_as(tiny_run, dataclasses.replace(cfg, steps=31))
    assert not finished_as(tiny_run, dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert not finished_as(tiny_run, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                                         conditioning="add")))
    assert not finished_as(tmp_path, cfg)  # no run there
