"""Ingest: manifests from real LeRobot v3.0 datasets, idempotency, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.episodes import split_of
from pipeline.ingest import run_ingest
from pipeline.ingest_config import IngestConfig
from pipeline.manifest import read_manifest
from pipeline.stage import ConfigMismatchError, ShardSpec, UserError

runner = CliRunner()


def ingest_cli(*args: str):
    return runner.invoke(app, ["ingest", *args])


def _cfg(root: Path, out: Path, **kw) -> IngestConfig:
    return IngestConfig(source=root.name, root=root, repo_id=f"local/{root.name}", out=out, **kw)


def test_help_lists_the_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ("data", "ingest", "datasets"):
        assert stage in result.output
    for stage in ("data", "ingest"):
        assert runner.invoke(app, [stage, "--help"]).exit_code == 0


def test_pusht_twenty_episodes_manifest_then_nothing_to_do(tmp_path):
    root, manifest = tmp_path / "pusht20", tmp_path / "m" / "pusht20.parquet"
    r = runner.invoke(app, ["data", "pusht", "--out", str(root), "--episodes", "20", "--frames-per-episode", "12"])
    assert r.exit_code == 0, r.output
    assert "data pusht: 20/20 episodes, 100% (" in r.output  # its progress, with rate and ETA in a log
    r = ingest_cli("--root", str(root), "--out", str(manifest))
    assert r.exit_code == 0, r.output
    df, meta = read_manifest(manifest)
    assert len(df) == 20 and (df.status == "ok").all()
    assert sorted(df.episode_index) == list(range(20))
    assert df.has_actions.all() and (df.action_dim == 2).all() and (df.length == 12).all()
    assert set(df.split) <= {"train", "val"} and meta["counts"] == {"ok": 20, "failed": 0}
    again = ingest_cli("--root", str(root), "--out", str(manifest))
    assert again.exit_code == 0 and "nothing to do" in again.output
    # same data again: the generator is idempotent too
    r = runner.invoke(app, ["data", "pusht", "--out", str(root), "--episodes", "20", "--frames-per-episode", "12"])
    assert r.exit_code == 0 and "nothing to do" in r.output


def test_manifest_rows_describe_where_frames_are(multicam_root, tmp_path):
    res = run_ingest(_cfg(multicam_root, tmp_path / "m.parquet"))
    assert res.n_failed == 0 and res.n_ok == 5
    df, meta = read_manifest(tmp_path / "m.parquet")
    assert meta["fps"] == 15 and len(meta["video_keys"]) == 3
    files = {f for vf in df.video_files for f in vf}
    assert len(files) > 3, "fixture must spread episodes over several video files"
    assert any(ts[0] > 0 for ts in df.from_ts), "fixture must put several episodes in one file"
    for _, row in df.iterrows():
        assert len(row.camera_keys) == len(row.video_files) == len(row.from_ts) == 3
        for f, a, b in zip(row.video_files, row.from_ts, row.to_ts):
            assert (multicam_root / f).exists() and round((b - a) * 15) == row.length
        assert (multicam_root / row.data_file).exists()


def test_own_arm_builtin_set_is_a_second_embodiment(tmp_path):
    """`wmctl data multicam --arm own` ("your own arm"): written by lerobot at 10 fps with 2 cameras under other
    keys and 7-D delta end-effector action and state, read back by lerobot, ingested as labelled; its built-in
    registry entry names those cameras and one action kind per dimension."""
    from pipeline.lerobot_compat import dataset_classes
    from pipeline.registry import resolve

    out = tmp_path / "own-arm"
    r = runner.invoke(app, ["data", "multicam", "--arm", "own", "--out", str(out), "--episodes", "2",
                            "--min-frames", "10", "--max-frames", "12"])
    assert r.exit_code == 0, r.output
    LeRobotDataset, _ = dataset_classes()
    ds = LeRobotDataset("local/own-arm", root=out, video_backend="pyav")
    assert ds.fps == 10 and ds.num_episodes == 2
    assert ds.meta.video_keys == ["observation.images.front", "observation.images.wrist"]
    item = ds[3]
    assert item["action"].shape == (7,) and item["observation.state"].shape == (7,)
    assert item["observation.images.wrist"].shape == (3, 180, 320)
    res = run_ingest(_cfg(out, tmp_path / "m.parquet"))
    df, meta = read_manifest(tmp_path / "m.parquet")
    assert res.n_ok == 2 and meta["fps"] == 10 and df.has_actions.all() and (df.action_dim == 7).all()
    spec = resolve("own-arm-demo")
    assert spec.cameras == tuple(meta["video_keys"]) and len(spec.action_kind) == 7
    r = runner.invoke(app, ["data", "multicam", "--arm", "ur5", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--arm 'ur5': one of ['droid', 'own']" in r.output


def test_action_free_dataset_is_marked(pusht_free_root, tmp_path):
    run_ingest(_cfg(pusht_free_root, tmp_path / "m.parquet"))
    df, _ = read_manifest(tmp_path / "m.parquet")
    assert (df.status == "ok").all() and not df.has_actions.any() and (df.action_dim == 0).all()


def test_changed_config_is_refused_then_forced(pusht_root, tmp_path):
    out = tmp_path / "m.parquet"
    run_ingest(_cfg(pusht_root, out))
    with pytest.raises(ConfigMismatchError, match="val_fraction: 0.1 -> 0.5"):
        run_ingest(_cfg(pusht_root, out, val_fraction=0.5))
    r = ingest_cli("--root", str(pusht_root), "--out", str(out), "--val-fraction", "0.5")
    assert r.exit_code == 2 and "val_fraction" in r.output
    res = run_ingest(_cfg(pusht_root, out, val_fraction=0.5, force=True))
    assert not res.nothing_to_do and res.n_ok == 6


def test_split_is_deterministic_and_near_fraction():
    splits = [split_of("droid", e, 0.2) for e in range(4000)]
    assert splits == [split_of("droid", e, 0.2) for e in range(4000)]
    assert 0.17 < splits.count("val") / 4000 < 0.23
    assert splits != [split_of("other", e, 0.2) for e in range(4000)]


def test_shards_merge_into_the_same_manifest(multicam_root, tmp_path):
    single = tmp_path / "single.parquet"
    run_ingest(_cfg(multicam_root, single, block_size=2))
    sharded = tmp_path / "sharded.parquet"
    first = run_ingest(_cfg(multicam_root, sharded, block_size=2, shard=ShardSpec(0, 2)))
    assert first.manifest is None and first.blocks_done_here == 2  # blocks 0 and 2 of 3
    second = run_ingest(_cfg(multicam_root, sharded, block_size=2, shard=ShardSpec(1, 2)))
    assert second.manifest == sharded
    a, b = read_manifest(single)[0], read_manifest(sharded)[0]
    pd.testing.assert_frame_equal(a, b)


# ------------------------------------------------------------------------------------ bad input
def _episode_row(root: Path, ep: int) -> pd.Series:
    df = pd.concat(pd.read_parquet(p) for p in sorted((root / "meta/episodes").glob("*/*.parquet")))
    return df[df.episode_index == ep].iloc[0]


def _rewrite_data(root: Path, ep: int, edit) -> Path:
    row = _episode_row(root, ep)
    path = root / f"data/chunk-{int(row['data/chunk_index']):03d}/file-{int(row['data/file_index']):03d}.parquet"
    table = pq.read_table(path)
    df = table.to_pandas()
    df = edit(df)
    pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), path)
    return path


def _check_one_failed(result, ep: int, *needles: str, n_total: int):
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.output
    assert f"episode {ep}:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert f"{n_total - 1} ok, 1 failed" in result.output


def test_missing_video_file(multicam_root, tmp_path, copy_dataset):
    root = copy_dataset(multicam_root)
    row = _episode_row(root, 4)
    cam = "observation.images.wrist_left"
    rel = (f"videos/{cam}/chunk-{int(row[f'videos/{cam}/chunk_index']):03d}/"
           f"file-{int(row[f'videos/{cam}/file_index']):03d}.mp4")
    (root / rel).unlink()
    sharing = [e for e in range(5) if (_episode_row(root, e)[f"videos/{cam}/file_index"],
                                       _episode_row(root, e)[f"videos/{cam}/chunk_index"])
               == (row[f"videos/{cam}/file_index"], row[f"videos/{cam}/chunk_index"])]
    r = ingest_cli("--root", str(root), "--out", str(tmp_path / "m.parquet"))
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == len(sharing) and all(rel in e and "missing" in e for e in errors)
    df, _ = read_manifest(tmp_path / "m.parquet")
    assert sorted(df[df.status == "failed"].episode_index) == sharing
    assert (df.status == "ok").sum() == 5 - len(sharing)


def test_truncated_video(multicam_root, tmp_path, copy_dataset):
    root = copy_dataset(multicam_root)
    cam = "observation.images.exterior_1_left"
    row = _episode_row(root, 0)
    path = root / (f"videos/{cam}/chunk-{int(row[f'videos/{cam}/chunk_index']):03d}/"
                   f"file-{int(row[f'videos/{cam}/file_index']):03d}.mp4")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    r = ingest_cli("--root", str(root), "--out", str(tmp_path / "m.parquet"))
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors and all(path.name in e and cam in e for e in errors)
    assert "episode 0:" in errors[0]
    df, _ = read_manifest(tmp_path / "m.parquet")
    assert (df.status == "ok").sum() >= 2, "episodes in other files must still be ingested"


def test_frame_count_mismatch(pusht_root, tmp_path, copy_dataset):
    root = copy_dataset(pusht_root)
    path = _rewrite_data(root, 2, lambda df: df[~((df.episode_index == 2) & (df.frame_index == 23))])
    r = ingest_cli("--root", str(root), "--out", str(tmp_path / "m.parquet"))
    _check_one_failed(r, 2, "frame count mismatch", "length=24", "23 rows", path.name, n_total=6)


def test_nan_actions(pusht_root, tmp_path, copy_dataset):
    root = copy_dataset(pusht_root)

    def poison(df):
        idx = df.index[(df.episode_index == 3) & (df.frame_index == 7)][0]
        df.at[idx, "action"] = np.array([np.nan, 1.0], dtype=np.float32)
        return df

    _rewrite_data(root, 3, poison)
    r = ingest_cli("--root", str(root), "--out", str(tmp_path / "m.parquet"))
    _check_one_failed(r, 3, "action has 1 non-finite values (first at frame 7)", n_total=6)
    # the same data ingested as action-free is fine: actions are not used
    r = ingest_cli("--root", str(root), "--out", str(tmp_path / "m2.parquet"), "--no-actions")
    assert r.exit_code == 0, r.output


def test_unknown_camera_key(pusht_root, tmp_path):
    out = str(tmp_path / "m.parquet")
    r = ingest_cli("--root", str(pusht_root), "--out", out, "--cameras", "observation.images.top")
    assert r.exit_code == 2
    assert "unknown camera key(s) ['observation.images.top']" in r.output and "observation.image" in r.output
    assert not (tmp_path / "m.parquet").exists()


def test_v21_dataset_gives_the_conversion_command(tmp_path):
    root = tmp_path / "old_ds"
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10, "features": {}}))
    (root / "meta/episodes.jsonl").write_text('{"episode_index": 0, "tasks": ["x"], "length": 3}\n')
    r = ingest_cli("--root", str(root))
    assert r.exit_code == 2
    assert "v2.1" in r.output and "convert_dataset_v21_to_v30 --repo-id=old_ds" in r.output
    assert f"--root={tmp_path.resolve()}" in r.output.replace("\n", "")


def test_path_that_is_not_a_dataset(tmp_path, pusht_root):
    r = ingest_cli("--root", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "no such directory" in r.output
    r = ingest_cli("--root", str(pusht_root.parent))
    assert r.exit_code == 2 and "is not a LeRobot dataset" in r.output and "Did you mean" in r.output
    with pytest.raises(UserError, match="meta/info.json is missing"):
        run_ingest(_cfg(tmp_path, tmp_path / "m.parquet"))


def test_interrupted_ingest_resumes_from_finished_blocks(pusht_root, tmp_path):
    out = tmp_path / "m.parquet"
    cfg = _cfg(pusht_root, out, block_size=2)
    calls = {"n": 0}

    def die_after_three():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # simulated kill in the middle of block 1

    with pytest.raises(KeyboardInterrupt):
        run_ingest(cfg, on_episode=die_after_three)
    assert sorted(p.name for p in (tmp_path / "m.parquet.parts").glob("block-*")) == ["block-000000.parquet"]
    seen = []
    res = run_ingest(cfg, on_episode=lambda: seen.append(1))
    assert res.manifest == out and res.n_ok == 6 and len(seen) == 4  # block 0 was not redone


def test_a_group_never_straddles_the_splits():
    """Property: for random groups of random sizes, every episode of a group gets the group's split, and the val
    share of groups stays near the fraction."""
    import random

    from pipeline.episodes import split_of

    rng = random.Random(0)
    for trial in range(200):
        sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 40))]
        frac = rng.choice([0.1, 0.2, 0.5])
        ep = 0
        for g, n in enumerate(sizes):
            splits = {split_of("droid", ep + i, frac, seed=trial, group=f"lab-{g}") for i in range(n)}
            assert len(splits) == 1, (trial, g, splits)
            ep += n
    many = [split_of("droid", 0, 0.2, group=f"scene-{g}") for g in range(4000)]
    assert abs(many.count("val") / len(many) - 0.2) < 0.03


def test_split_by_a_scene_in_the_task_text(multicam_root, tmp_path):
    from pipeline.episodes import check_groups

    out = tmp_path / "m.parquet"
    r = runner.invoke(app, ["ingest", "--root", str(multicam_root), "--out", str(out), "--val-fraction", "0.5",
                            "--split-by", "task:scene (\\d+)"])
    assert r.exit_code == 0, r.output
    df, meta = read_manifest(out)
    assert meta["config"]["split_by"] == "task:scene (\\d+)"
    assert set(df.split_group) == {"0", "1", "2"}  # 5 episodes, 2 per scene
    assert (df.groupby("split_group").split.nunique() == 1).all()
    assert "split by task:scene (\\d+): train" in r.output and "groups" in r.output
    bad = df.copy()
    bad.loc[bad.split_group == "0", "split"] = ["train", "val"]
    with pytest.raises(UserError, match="both train and val"):
        check_groups(bad)
    r = runner.invoke(app, ["ingest", "--root", str(multicam_root), "--out", str(tmp_path / "x.parquet"),
                            "--split-by", "lab_id"])
    assert r.exit_code == 2 and "no such per-episode column" in r.output and "episode_index" in r.output
    r = runner.invoke(app, ["ingest", "--root", str(multicam_root), "--out", str(tmp_path / "y.parquet"),
                            "--split-by", "task:kitchen (\\d+)"])
    assert r.exit_code == 1 and "does not match" in r.output  # every episode fails, named, nothing else lost


def test_val_episodes_holds_out_an_exact_number_of_whole_episodes(pusht_root, tmp_path):
    """A benchmark needs a fixed held-out set of a known size: --val-episodes N holds out exactly N episodes, the
    same ones on every run (hash order), and is refused when it would leave nothing to train on."""
    from pipeline.episodes import exact_val_episodes
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig
    from pipeline.manifest import read_manifest
    from pipeline.stage import UserError

    def ingest(out, n):
        run_ingest(IngestConfig(source="pusht", root=pusht_root, repo_id="local/pusht", out=out, val_episodes=n))
        df, meta = read_manifest(out)
        return sorted(df.episode_index[df.split == "val"]), meta

    val, meta = ingest(tmp_path / "a.parquet", 2)
    assert len(val) == 2 and meta["config"]["val_episodes"] == 2 and "val_fraction" not in meta["config"]
    assert ingest(tmp_path / "b.parquet", 2)[0] == val
    assert set(val) == exact_val_episodes("pusht", list(range(6)), 2)
    assert set(exact_val_episodes("pusht", list(range(6)), 3)) > set(val)  # one more: the next in hash order
    with pytest.raises(UserError, match="keep some for training"):
        exact_val_episodes("pusht", list(range(6)), 6)
    with pytest.raises(UserError, match="--val-episodes"):
        IngestConfig(source="pusht", root=pusht_root, repo_id="local/pusht", out=tmp_path / "c.parquet",
                     val_episodes=2, split_by="task")
