"""Token store: exact tokens, crash safety (real SIGKILL), shards and Dask, failures, plain-Zarr access."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from featurestore.augment import ClipAugment
from featurestore.encode import EncodeConfig, run_encode
from featurestore.encoders import HFDinoEncoder, Preprocess, init_random_dinov3
from featurestore.reader import MissingTokensError, TokenReader, Window
from featurestore.status import store_status
from featurestore.store import StoreLayout
from pipeline.frames import PyAVFrameSource, VideoSpan
from pipeline.manifest import read_manifest
from pipeline.stage import ConfigMismatchError, ShardSpec, UserError

PRE = Preprocess(height=64, width=64)


def _cfg(manifest: Path, store: Path, encoder: Path, **kw) -> EncodeConfig:
    layout = kw.pop("layout", StoreLayout(episodes_per_segment=2, chunk_frames=2, shard_frames=8))
    return EncodeConfig(manifest=manifest, store=store, encoder=str(encoder), preprocess=PRE, layout=layout,
                        batch_size=kw.pop("batch_size", 8), threads=kw.pop("threads", 1), **kw)


def _cli_args(cfg: EncodeConfig) -> list[str]:
    lay = cfg.layout
    return [sys.executable, "-m", "pipeline.cli", "encode", "--manifest", str(cfg.manifest), "--store",
            str(cfg.store), "--encoder", cfg.encoder, "--image-size", f"{PRE.height}x{PRE.width}",
            "--batch-size", str(cfg.batch_size), "--threads", str(cfg.threads), "--chunk-frames",
            str(lay.chunk_frames), "--shard-frames", str(lay.shard_frames), "--episodes-per-segment",
            str(lay.episodes_per_segment)]


def assert_stores_equal(a: Path, b: Path) -> None:
    ra, rb = TokenReader(a), TokenReader(b)
    cols = ["source", "segment", "episode_index", "view", "start", "length", "split"]
    assert ra.episodes[cols].equals(rb.episodes[cols])
    for i in range(len(ra.episodes)):
        x, y = ra.episode(i), rb.episode(i)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"episode row {i}, {k}")


def _frames_of(manifest: Path, episode: int, cam: int) -> np.ndarray:
    df, meta = read_manifest(manifest)
    e = df[df.episode_index == episode].iloc[0]
    span = VideoSpan(Path(e.root) / e.video_files[cam], float(e.from_ts[cam]), int(e.length), float(meta["fps"]))
    with PyAVFrameSource() as src:
        return src.read_episode(span)


def test_tokens_equal_a_direct_forward(multicam_manifest, tiny_encoder, tmp_path):
    run_encode(_cfg(multicam_manifest, tmp_path / "f16.zarr", tiny_encoder))
    run_encode(_cfg(multicam_manifest, tmp_path / "i8.zarr", tiny_encoder,
                    layout=StoreLayout(dtype="int8", episodes_per_segment=2, chunk_frames=2, shard_frames=8)))
    enc = HFDinoEncoder(str(tiny_encoder), preprocess=PRE)
    f16, i8 = TokenReader(tmp_path / "f16.zarr"), TokenReader(tmp_path / "i8.zarr")
    assert enc.grid == (4, 4) and enc.num_registers == 4
    for row in range(len(f16.episodes)):
        ep = int(f16.episodes.iloc[row].episode_index)
        got, got8 = f16.episode(row), i8.episode(row)
        for cam in range(3):
            direct = enc.forward_preprocessed(PRE(torch.from_numpy(_frames_of(multicam_manifest, ep, cam))))
            ref = direct["patch"].numpy()  # [T, P, D] float32
            assert got["patch"].shape == (len(ref), 3, 16, 32)
            np.testing.assert_allclose(got["patch"][:, cam], ref, rtol=1e-3, atol=2e-3)
            np.testing.assert_allclose(got["cls"][:, cam], direct["cls"].numpy(), rtol=1e-3, atol=2e-3)
            a, b = got8["patch"][:, cam].reshape(-1, 32), ref.reshape(-1, 32)
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            assert cos.min() >= 0.999, cos.min()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_projected_size_is_the_schema_s_bytes(multicam_manifest, tiny_encoder, tmp_path, dtype):
    """The size `wmctl encode` projects before it starts equals the uncompressed bytes of every array it then
    commits (patch, int8's scale, cls, the low-dim arrays), frame for frame; what it reports written is the
    source's size on disk."""
    from featurestore.store import TokenStore, projected_bytes

    res = run_encode(_cfg(multicam_manifest, tmp_path / "s.zarr", tiny_encoder,
                          layout=StoreLayout(dtype=dtype, episodes_per_segment=2)))
    store = TokenStore.open_existing(tmp_path / "s.zarr")
    (source,) = store.sources()
    logical, frames = 0, 0
    for seg in (tmp_path / "s.zarr" / "sources" / source / "segments").iterdir():
        if seg.is_dir():
            g = zarr.open_group(seg, mode="r")
            logical += sum(a.nbytes for _, a in g.arrays())
            frames += g["patch"].shape[0]
    assert frames == res.frames > 0 and res.projected_bytes == logical
    df, _ = read_manifest(multicam_manifest)
    ok = df[df.status == "ok"]
    assert res.projected_bytes == projected_bytes(int(ok.length.sum()), cameras=3, tokens=16, dim=32, dtype=dtype,
                                                  action_dim=int(ok.action_dim.max()),
                                                  state_dim=int(ok.state_dim.max()))
    segments = [f for f in (tmp_path / "s.zarr" / "sources" / source / "segments").glob("*/**/*") if f.is_file()]
    assert res.bytes_written == sum(f.stat().st_size for f in segments) > 0  # the committed segments on disk
    assert res.estimated_bytes < res.projected_bytes  # the estimate on disk: the tokens compress a little


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_the_size_on_disk_estimated_before_encoding_at_5_fps_is_within_10_percent(multicam_manifest, tiny_encoder,
                                                                                   tmp_path, dtype):
    """`wmctl encode --fps 5` on the multi-camera set at 224x224 (14x14 tokens, the store's default layout):
    before encoding it estimates the size on disk from the tokens of a sample of frames through the store's
    codec; the size written after is within 10% of it (toy token sizes are not the test: there a segment's
    few KB of metadata weigh as much as its tokens)."""
    kinds = ("delta",) * 6 + ("absolute",) * 2
    res = run_encode(EncodeConfig(manifest=multicam_manifest, store=tmp_path / "s.zarr", encoder=str(tiny_encoder),
                                  preprocess=Preprocess(height=224, width=224), layout=StoreLayout(dtype=dtype),
                                  batch_size=16, threads=1, fps=5.0, action_kind=kinds))
    assert res.frames > 0 and res.estimated_bytes < res.projected_bytes
    assert abs(res.bytes_written / res.estimated_bytes - 1) <= 0.10, (res.bytes_written, res.estimated_bytes)


def test_encode_at_a_rate_stores_every_kth_frame_with_its_step_s_actions(multicam_manifest, tiny_encoder, tmp_path):
    """`--fps 5` on the 15-fps multi-camera set: every third frame of each episode (its tokens those of the same
    frame in a full-rate store, its timestamp and frame index the dataset's), one action per stored frame added
    up over the step by kind (delta dims summed, absolute ones the last; an incomplete last step invalid); the
    source records its rate, and the same source at another rate is refused; bad rates and a labelled source
    without an action kind are refused with the fix named."""
    from featurestore.store import TokenStore
    from pipeline.stage import UserError

    kinds = ("delta",) * 6 + ("absolute",) * 2
    full = run_encode(_cfg(multicam_manifest, tmp_path / "full.zarr", tiny_encoder))
    res = run_encode(_cfg(multicam_manifest, tmp_path / "5fps.zarr", tiny_encoder, fps=5.0, action_kind=kinds))
    df, _ = read_manifest(multicam_manifest)
    ok = df[df.status == "ok"]
    assert res.frames == sum(-(-int(n) // 3) for n in ok.length) and res.frames * 3 >= full.frames
    store = TokenStore.open_existing(tmp_path / "5fps.zarr")
    attrs = store.source_attrs("multicam")
    assert attrs["stride"] == 3 and attrs["stored_fps"] == 5.0 and attrs["action_kind"] == list(kinds)
    a, b = TokenReader(tmp_path / "full.zarr"), TokenReader(tmp_path / "5fps.zarr")
    for row in range(len(b.episodes)):
        ep = int(b.episodes.iloc[row].episode_index)
        got = b.episode(row)
        ref = a.episode(int(np.flatnonzero(a.episodes.episode_index.to_numpy() == ep)[0]))
        n = len(ref["patch"])
        keep = np.arange(0, n, 3)
        assert len(got["patch"]) == len(keep) == int(b.episodes.iloc[row].length)
        np.testing.assert_allclose(got["patch"], ref["patch"][keep], rtol=1e-3, atol=2e-3)
        np.testing.assert_array_equal(got["frame_index"], keep)
        np.testing.assert_array_equal(got["timestamp"], ref["timestamp"][keep])
        np.testing.assert_array_equal(got["state"], ref["state"][keep])
        whole = n // 3
        steps = ref["action"][: whole * 3].reshape(whole, 3, -1)
        np.testing.assert_allclose(got["action"][:whole, :6], steps[:, :, :6].sum(1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["action"][:whole, 6:], steps[:, -1, 6:])
        assert got["action_valid"][:whole].all() and not got["action_valid"][whole:].any()
        assert np.isnan(got["action"][whole:]).all()
    with pytest.raises(ConfigMismatchError, match="stride"):
        run_encode(_cfg(multicam_manifest, tmp_path / "5fps.zarr", tiny_encoder, fps=7.5, action_kind=kinds))
    with pytest.raises(UserError, match=r"is at 15 fps.*nearest it can serve: 3.75 or 5 fps"):
        run_encode(_cfg(multicam_manifest, tmp_path / "x.zarr", tiny_encoder, fps=4.0, action_kind=kinds))
    with pytest.raises(UserError, match=r"source multicam has actions but no `action_kind`"):
        run_encode(_cfg(multicam_manifest, tmp_path / "x.zarr", tiny_encoder, fps=5.0))


def test_augmented_views_are_consistent_per_clip(pusht_manifest, tiny_encoder, tmp_path):
    cfg = _cfg(pusht_manifest, tmp_path / "aug.zarr", tiny_encoder, augment_views=1, augment_seed=3)
    run_encode(cfg)
    reader = TokenReader(cfg.store)
    eps = reader.episodes
    assert sorted(eps.view.unique()) == [0, 1] and eps[eps.view == 1].augmented.all()
    row = int(eps[(eps.view == 1)].index[0])
    e = eps.iloc[row]
    aug = ClipAugment.sample(seed=3, source="pusht", episode=int(e.episode_index), view=1, strength=0.5)
    seg = reader.store.committed_segments("pusht")[e.segment]
    table = {x["episode_index"]: x for x in seg["episodes"]}
    assert table[int(e.episode_index)]["augment"] == aug.to_dict()
    enc = HFDinoEncoder(str(tiny_encoder), preprocess=PRE)
    frames = torch.from_numpy(_frames_of(pusht_manifest, int(e.episode_index), 0))
    ref = enc.forward_preprocessed(PRE(frames, aug))["patch"].numpy()
    np.testing.assert_allclose(reader.episode(row)["patch"][:, 0], ref, rtol=1e-3, atol=2e-3)
    orig = eps[(eps.view == 0) & (eps.episode_index == e.episode_index)].index[0]
    assert not np.allclose(reader.episode(int(orig))["patch"], reader.episode(row)["patch"], atol=1e-2)


@pytest.mark.slow
def test_sigkill_half_way_then_resume_equals_uninterrupted(multicam_manifest, tiny_encoder, tmp_path):
    layout = StoreLayout(episodes_per_segment=1, chunk_frames=2, shard_frames=8)
    ref = _cfg(multicam_manifest, tmp_path / "ref.zarr", tiny_encoder, layout=layout)
    run_encode(ref)
    cfg = dataclasses.replace(ref, store=tmp_path / "killed.zarr", batch_size=1)
    proc = subprocess.Popen(_cli_args(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    segments = cfg.store / "sources" / "multicam" / "segments"
    deadline = time.monotonic() + 120
    staging_dir = segments.parent / "staging"
    while time.monotonic() < deadline and proc.poll() is None:  # kill in the middle of the third segment
        if (segments.is_dir() and sum(p.is_dir() for p in segments.iterdir()) >= 2
                and any((p / "patch").is_dir() for p in staging_dir.iterdir())):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = sum(p.is_dir() for p in segments.iterdir())
    assert 2 <= committed < 5, f"the kill must land half-way (committed {committed}/5)"
    staging = [p for p in (segments.parent / "staging").iterdir() if p.is_dir()]
    assert len(staging) == 1, "the killed process leaves its in-progress segment in staging"
    with pytest.raises(Exception):  # noqa: B017 - readers never see the uncommitted segment
        zarr.open_group(segments / staging[0].name.split(".")[0], mode="r")
    second = run_encode(cfg)
    assert second.segments_committed == 5 - committed and not second.failures
    assert not [p for p in (segments.parent / "staging").iterdir() if p.is_dir()], "stale staging is cleaned"
    assert_stores_equal(ref.store, cfg.store)
    reader = TokenReader(cfg.store)
    df, _ = read_manifest(multicam_manifest)
    assert sorted(reader.episodes.episode_index) == sorted(df.episode_index)  # no duplicate, none missing
    for i in range(len(reader.episodes)):
        np.testing.assert_array_equal(reader.episode(i, ("frame_index",))["frame_index"],
                                      np.arange(reader.episodes.iloc[i].length))
    third = run_encode(cfg)
    assert third.nothing_to_do


@pytest.mark.slow
def test_three_shard_processes_and_dask_equal_single_process(multicam_manifest, tiny_encoder, tmp_path):
    single = _cfg(multicam_manifest, tmp_path / "single.zarr", tiny_encoder)
    run_encode(single)
    sharded = dataclasses.replace(single, store=tmp_path / "sharded.zarr")
    procs = [subprocess.Popen(_cli_args(sharded) + ["--shard", f"{i}/3"], stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_stores_equal(single.store, sharded.store)
    dask_cfg = dataclasses.replace(single, store=tmp_path / "dask.zarr", dask="local", dask_workers=2)
    res = run_encode(dask_cfg)
    assert res.segments_committed == 3 and res.frames == sum(TokenReader(single.store).episodes.length)
    assert_stores_equal(single.store, dask_cfg.store)


def test_corrupt_video_fails_its_episodes_and_the_rest_commit(multicam_root, tiny_encoder, tmp_path,
                                                              copy_dataset):
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig

    root = copy_dataset(multicam_root, "multicam")
    manifest = tmp_path / "m.parquet"
    run_ingest(IngestConfig(source="multicam", root=root, repo_id="local/mc", out=manifest))
    df, _ = read_manifest(manifest)
    victim = root / df.iloc[-1].video_files[1]  # damaged after ingest: only decoding can find out
    hit = sorted(int(e) for e, files in zip(df.episode_index, df.video_files) if root / files[1] == victim)
    st = victim.stat()  # bit rot: the same size and mtime, so the fingerprint ingest recorded cannot see it
    with open(victim, "r+b") as f:
        f.truncate(st.st_size // 3)
        f.truncate(st.st_size)  # the lost two thirds read back as zeros
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg = _cfg(manifest, tmp_path / "s.zarr", tiny_encoder)
    res = run_encode(cfg)
    assert sorted(ep for _, ep, _, _ in res.failures) == hit
    assert all(victim.name in why for *_, why in res.failures)
    reader = TokenReader(cfg.store)
    assert sorted(reader.episodes.episode_index) == sorted(set(df.episode_index) - set(hit))
    info = store_status(cfg.store)["sources"][0]
    assert info["episodes_failed"] == len(hit) and info["episodes_pending"] == 0
    failed = reader.store.failed("multicam")
    assert {f["episode_index"] for f in failed.values()} == set(hit)
    assert run_encode(cfg).nothing_to_do
    again = run_encode(dataclasses.replace(cfg, retry_failed=True))
    assert sorted(ep for _, ep, _, _ in again.failures) == hit and again.segments_committed == 0
    r = subprocess.run(_cli_args(dataclasses.replace(cfg, store=tmp_path / "cli.zarr")), capture_output=True,
                       text=True)
    assert r.returncode == 1 and f"multicam episode {hit[0]} (view 0)" in r.stderr


def test_other_encoder_is_refused_with_the_differing_fields(pusht_manifest, tiny_encoder, tmp_path):
    store = tmp_path / "s.zarr"
    run_encode(_cfg(pusht_manifest, store, tiny_encoder))
    other = init_random_dinov3(tmp_path / "other-enc", preset="tiny", seed=1)
    with pytest.raises(ConfigMismatchError, match="encoder.weights_sha256"):
        run_encode(_cfg(pusht_manifest, store, other))
    with pytest.raises(ConfigMismatchError, match=r"encoder.preprocess.height: 64 -> 32"):
        run_encode(dataclasses.replace(_cfg(pusht_manifest, store, tiny_encoder), preprocess=Preprocess(height=32,
                                                                                                       width=64)))
    res = run_encode(_cfg(pusht_manifest, store, other, force=True))
    assert res.segments_committed > 0
    reader = TokenReader(store)  # named by its weights (preset and seed), found again by where it was loaded from
    assert reader.encoder["model_id"] == "random-dinov3-tiny-seed1"
    assert reader.store.encoder_location == str(other.resolve())


def test_an_encoder_is_known_by_its_saved_weights_and_by_the_hash_older_stores_recorded(pusht_manifest,
                                                                                         tiny_encoder, tmp_path):
    """transformers renames modules between versions (the DINOv3 layers moved under `model.` in 5.x), which changed
    the loaded model's state-dict hash for the same weights file: a store, run or closed loop made before an upgrade
    was refused as "the weights changed". The identity now hashes the checkpoint as saved; the loaded model's hash
    (what stores made before recorded) still names the same encoder; other weights stay refused."""
    import json

    from featurestore.encoders import encoder_for, saved_weights_sha256, weights_sha256

    enc = HFDinoEncoder(str(tiny_encoder), preprocess=PRE)
    saved = saved_weights_sha256(tiny_encoder)
    assert enc.identity()["weights_sha256"] == saved
    assert enc._hashes is None  # the loaded model is hashed only when a recorded identity needs it
    # what an older wmctl recorded: the loaded model's hash, and the folder's absolute path as the model id
    legacy = dict(enc.identity(), weights_sha256=weights_sha256(enc.model), model_id=str(tiny_encoder.resolve()))
    assert enc.identity(legacy) == legacy and enc.weights_hashes() == {saved, legacy["weights_sha256"]}
    assert encoder_for(legacy).identity(legacy) == legacy
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        encoder_for(dict(legacy, weights_sha256="1" * 64))
    # a store recorded with the legacy hash resumes: nothing re-encoded, the recorded identity kept
    store = tmp_path / "s.zarr"
    first = run_encode(_cfg(pusht_manifest, store, tiny_encoder))
    root = json.loads((store / "zarr.json").read_text())
    key = next(k for k, v in root["attributes"].items() if isinstance(v, dict) and "encoder" in v)
    root["attributes"][key]["encoder"]["weights_sha256"] = legacy["weights_sha256"]
    (store / "zarr.json").write_text(json.dumps(root))
    again = run_encode(_cfg(pusht_manifest, store, tiny_encoder))
    assert first.segments_committed > 0 and again.segments_committed == 0
    assert TokenReader(store).encoder["weights_sha256"] == legacy["weights_sha256"]


def test_an_encoder_is_the_same_in_two_clones_at_different_paths(pusht_manifest, tiny_encoder, tmp_path):
    """The identity follows the weights, not where they lie: the same folder copied to two places (two clones of
    a project) gives one identity, a store made from one copy takes tokens from the other, and a later stage finds
    the encoder again from the store's hint, from a folder the user names, or under its provisioned name; other
    weights at a hinted place are refused."""
    import shutil

    from featurestore.encoders import encoder_for, identity_key

    a, b = tmp_path / "clone-a" / "enc", tmp_path / "clone-b" / "models" / "enc"
    shutil.copytree(tiny_encoder, a)
    shutil.copytree(tiny_encoder, b)
    ia, ib = HFDinoEncoder(str(a), preprocess=PRE).identity(), HFDinoEncoder(str(b), preprocess=PRE).identity()
    assert ia == ib and ia["model_id"] == "random-dinov3-tiny-seed0" and str(tmp_path) not in json.dumps(ia)
    store = tmp_path / "s.zarr"
    first = run_encode(_cfg(pusht_manifest, store, a))
    assert first.segments_committed > 0
    again = run_encode(_cfg(pusht_manifest, store, b))  # the other clone's copy: the same encoder, nothing to do
    assert again.segments_committed == 0
    reader = TokenReader(store)
    assert reader.store.encoder_location == str(a.resolve())
    assert encoder_for(reader.encoder, hints=(reader.store.encoder_location,)).location == str(a.resolve())
    shutil.rmtree(a)  # moved away: the user names where it is now
    with pytest.raises(UserError, match="pass its folder with --encoder"):
        encoder_for(reader.encoder, hints=(reader.store.encoder_location,))
    assert encoder_for(reader.encoder, hints=(str(b), reader.store.encoder_location)).location == str(b.resolve())
    other = init_random_dinov3(tmp_path / "other", preset="tiny", seed=3)
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        encoder_for(reader.encoder, hints=(str(other),))
    assert identity_key(ia) == identity_key(dict(ia, model_id="/old/absolute/path"))


def test_second_dataset_appends_a_source(pusht_manifest, pusht_free_manifest, tiny_encoder,
                                                         tmp_path):
    store = tmp_path / "s.zarr"
    run_encode(_cfg(pusht_manifest, store, tiny_encoder))
    seg_dir = store / "sources" / "pusht" / "segments"
    before = {p.name: (p / "patch" / "zarr.json").stat().st_mtime_ns for p in seg_dir.iterdir() if p.is_dir()}
    res = run_encode(_cfg(pusht_free_manifest, store, tiny_encoder))
    assert res.segments_committed > 0
    reader = TokenReader(store)
    assert set(reader.episodes.source) == {"pusht", "pusht-free"}
    assert not reader.episodes[reader.episodes.source == "pusht-free"].has_actions.any()
    after = {p.name: (p / "patch" / "zarr.json").stat().st_mtime_ns for p in seg_dir.iterdir() if p.is_dir()}
    assert after == before, "committed segments are never rewritten"
    free = reader.episode(int(reader.episodes[reader.episodes.source == "pusht-free"].index[0]))
    assert np.isnan(free["action"]).all() and not free["action_valid"].any()


def test_new_episodes_of_a_dataset_append_segments(tiny_encoder, tmp_path):
    from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig

    root, manifest, store = tmp_path / "arm", tmp_path / "arm.parquet", tmp_path / "s.zarr"
    layout = StoreLayout(episodes_per_segment=16)
    for n, force in ((3, False), (5, True)):  # the user records 2 more episodes; same seed: first 3 unchanged
        run_data_pusht(PushtDataConfig(out=root, episodes=n, frames_per_episode=12, seed=4), force=force)
        run_ingest(IngestConfig(source="arm", root=root, repo_id="local/arm", out=manifest, force=force))
        first = run_encode(_cfg(manifest, store, tiny_encoder, layout=layout))
        segs = TokenReader(store).store.committed_segments("arm")
        if n == 3:
            (seg1,) = segs
            stamp = (store / "sources/arm/segments" / seg1 / "patch/zarr.json").stat().st_mtime_ns
    assert first.segments_committed == 1 and first.frames == 2 * 12
    assert len(segs) == 2 and seg1 in segs
    assert [e["episode_index"] for e in segs[seg1]["episodes"]] == [0, 1, 2]
    assert (store / "sources/arm/segments" / seg1 / "patch/zarr.json").stat().st_mtime_ns == stamp
    assert sorted(TokenReader(store).episodes.episode_index) == [0, 1, 2, 3, 4]


def test_store_opens_with_plain_zarr_and_dask(pusht_manifest, tiny_encoder, tmp_path):
    import dask.array as da

    store = tmp_path / "s.zarr"
    run_encode(_cfg(pusht_manifest, store, tiny_encoder, layout=StoreLayout(episodes_per_segment=16)))
    root = zarr.open_group(store, mode="r")
    attrs = root.attrs["wmctl_token_store"]
    assert "frame-major" in attrs["description"] and attrs["encoder"]["num_register_tokens"] == 4
    src = root["sources/pusht"]
    assert src.attrs["wmctl_source"]["fps"] == 10 and src.attrs["wmctl_source"]["cameras"] == ["observation.image"]
    (seg_id,) = list(src["segments"].group_keys())
    seg = src["segments"][seg_id]
    patch = da.from_zarr(seg["patch"])
    assert patch.shape == (6 * 24, 1, 16, 32)
    assert np.isfinite(patch.astype("float32").mean().compute())
    table = seg.attrs["wmctl_segment"]["episodes"]
    assert [e["start"] for e in table] == [24 * i for i in range(6)]
    assert seg["action_valid"][:].all() and seg["action"].shape == (144, 2)


def test_reader_windows_strides_workers_and_missing_chunks(pusht_manifest, tiny_encoder, tmp_path):
    store = tmp_path / "s.zarr"
    run_encode(_cfg(pusht_manifest, store, tiny_encoder))
    reader = TokenReader(store)
    full = reader.episode(1)
    w = reader.read(Window(1, 3, 5, stride=2))
    np.testing.assert_array_equal(w["patch"], full["patch"][3:12:2])
    np.testing.assert_array_equal(w["action"], full["action"][3:12:2])
    with pytest.raises(IndexError, match="outside episode"):
        reader.read(Window(1, 20, 5, stride=1))
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read(Window(1, 3, 5, stride=2))["patch"], w["patch"])
    loader = torch.utils.data.DataLoader(_WindowDataset(reader), batch_size=2, num_workers=1,
                                         multiprocessing_context="spawn")
    batch = next(iter(loader))
    np.testing.assert_array_equal(batch.numpy()[0], reader.read(Window(0, 0, 4))["patch"])
    # a shard that vanished reads as fill values: the reader must refuse it
    e = reader.episodes.iloc[0]
    shard = store / "sources" / e.source / "segments" / e.segment / "patch" / "c" / str(int(e.start) // 8) / "0/0/0"
    shard.unlink()
    fresh = TokenReader(store)
    with pytest.raises(MissingTokensError, match="missing chunks"):
        fresh.read(Window(0, 0, 4))


class _WindowDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.from_numpy(self.reader.read(Window(i, 0, 4))["patch"])


def test_status_counts(pusht_manifest, tiny_encoder, tmp_path):
    store = tmp_path / "s.zarr"
    cfg = _cfg(pusht_manifest, store, tiny_encoder, shard=ShardSpec(0, 2))
    run_encode(cfg)
    info = store_status(store)
    (s,) = info["sources"]
    df, _ = read_manifest(pusht_manifest)
    assert s["episodes_committed"] + s["episodes_pending"] == len(df) and s["episodes_pending"] > 0
    assert s["frames"] == 24 * s["episodes_committed"] and s["bytes"] > 0
    assert info["encoder"]["random_weights"] is True
