"""FrameSource: sequential PyAV decoding returns exactly lerobot's pixels, opening each file once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import pipeline.frames as frames_mod
from pipeline.frames import FrameDecodeError, FrameSource, PyAVFrameSource, VideoSpan
from pipeline.lerobot_io import open_meta


def _spans(meta, cam):
    for _, row in meta.episodes.iterrows():
        yield row, VideoSpan(meta.video_path(row, cam), float(row[f"videos/{cam}/from_timestamp"]),
                             int(row["length"]), meta.fps)


def test_every_frame_of_every_camera_equals_lerobot(multicam_root):
    from pipeline.lerobot_compat import dataset_classes

    LeRobotDataset, _ = dataset_classes()

    meta = open_meta(multicam_root, "local/multicam")
    ds = LeRobotDataset("local/multicam", root=multicam_root, video_backend="pyav")
    assert len(meta.video_keys) == 3
    compared = 0
    with PyAVFrameSource() as src:
        assert isinstance(src, FrameSource)
        for cam in meta.video_keys:
            for row, span in _spans(meta, cam):
                ours = src.read_episode(span)
                assert ours.shape == (span.length, 180, 320, 3) and ours.dtype == np.uint8
                start = int(row["dataset_from_index"])
                for i in range(span.length):
                    theirs = ds[start + i][cam]  # float32 [3, H, W] in [0, 1]
                    mine = torch.from_numpy(ours[i]).permute(2, 0, 1).float() / 255
                    assert torch.equal(mine, theirs), f"{cam} episode {row['episode_index']} frame {i}"
                    compared += 1
    assert compared == 3 * int(meta.episodes["length"].sum())


def test_sequential_reading_opens_each_file_once(multicam_root, monkeypatch):
    opened = Counter()
    real_open = frames_mod.av.open

    def counting_open(path, *a, **kw):
        opened[path] += 1
        return real_open(path, *a, **kw)

    monkeypatch.setattr(frames_mod.av, "open", counting_open)
    meta = open_meta(multicam_root, "local/multicam")
    cam = meta.video_keys[0]
    src = PyAVFrameSource(max_open=1)
    n = sum(len(src.read_episode(span)) for _, span in _spans(meta, cam))
    assert n == meta.episodes["length"].sum()
    files = {str(span.path) for _, span in _spans(meta, cam)}
    assert set(opened) == files and all(v == 1 for v in opened.values()), opened
    src.close()


def test_streaming_is_lazy_and_resize_works(multicam_root):
    meta = open_meta(multicam_root, "local/multicam")
    _, span = next(_spans(meta, meta.video_keys[2]))
    with PyAVFrameSource(size=(90, 160)) as src:
        it = src.frames(span)
        first = next(it)
        assert first.shape == (90, 160, 3)
        it.close()  # abandoning a half-read episode must not break the next read
        again = src.read_episode(span)
    with PyAVFrameSource() as full:
        native = full.read_episode(span)
    assert len(again) == span.length
    # area resize of a 2x downscale equals the 2x2 mean up to rounding and chroma filtering
    pooled = native.reshape(span.length, 90, 2, 160, 2, 3).mean(axis=(2, 4))
    assert np.abs(pooled - again).mean() < 3.0


def test_span_past_the_end_is_a_clear_error(pusht_root):
    meta = open_meta(pusht_root, "local/pusht")
    _, span = next(_spans(meta, meta.video_keys[0]))
    total = int(meta.episodes["length"].sum())
    bad = VideoSpan(span.path, span.from_ts, total + 5, span.fps)
    with PyAVFrameSource() as src, pytest.raises(FrameDecodeError, match="video ends before frame"):
        src.read_episode(bad)
    missing = VideoSpan(span.path.with_name("nope.mp4"), 0.0, 3, span.fps)
    with PyAVFrameSource() as src, pytest.raises(FrameDecodeError, match="is missing"):
        src.read_episode(missing)
