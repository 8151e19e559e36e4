"""Shared fixtures: small real LeRobot v3.0 datasets written by lerobot itself, once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Never reach for the Hub from tests; keep HF caches out of the user's home.
_HF_TMP = Path(tempfile.mkdtemp(prefix="wmctl-hf-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(_HF_TMP / "hf"))
os.environ.setdefault("HF_LEROBOT_HOME", str(_HF_TMP / "lerobot"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_HF_TMP / "datasets"))
os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def pusht_root(tmp_path_factory) -> Path:
    from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht

    out = tmp_path_factory.mktemp("data") / "pusht"
    run_data_pusht(PushtDataConfig(out=out, episodes=6, frames_per_episode=24, seed=0, repo_id="local/pusht"))
    return out


@pytest.fixture(scope="session")
def pusht_free_root(tmp_path_factory) -> Path:
    from pipeline.demodata.pusht import PushtDataConfig, run_data_pusht

    out = tmp_path_factory.mktemp("data") / "pusht-free"
    run_data_pusht(PushtDataConfig(out=out, episodes=6, frames_per_episode=24, seed=1, action_free=True,
                                   repo_id="local/pusht-free"))
    return out


@pytest.fixture(scope="session")
def multicam_root(tmp_path_factory) -> Path:
    """5 episodes, 3 cameras; limits small enough that files hold 1-3 episodes across 2 chunk folders."""
    from pipeline.demodata.multicam import MulticamDataConfig, run_data_multicam

    out = tmp_path_factory.mktemp("data") / "multicam"
    run_data_multicam(MulticamDataConfig(out=out, episodes=5, min_frames=14, max_frames=24, seed=0,
                                         data_files_size_in_mb=0.008, video_files_size_in_mb=0.05,
                                         chunks_size=2, repo_id="local/multicam"))
    return out


@pytest.fixture(scope="session")
def metaworld_root(tmp_path_factory) -> Path:
    """Meta-World reach at 20 fps: 6 episodes of 16 frames, 64x64 exterior + wrist cameras (headless EGL)."""
    from pipeline.demodata.metaworld import MetaworldDataConfig, run_data_metaworld

    out = tmp_path_factory.mktemp("data") / "metaworld-reach"
    run_data_metaworld(MetaworldDataConfig(out=out, task="reach", episodes=6, frames_per_episode=16, size=64, seed=0,
                                           repo_id="local/metaworld-reach"))
    return out


@pytest.fixture
def copy_dataset(tmp_path):
    """copy_dataset(src) -> a private copy under tmp_path (for tests that damage a dataset)."""

    def _copy(src: Path, name: str = "ds") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny DINOv3 with random weights, saved with save_pretrained (dim 32, 2 layers, 4 registers)."""
    from featurestore.encoders import init_random_dinov3

    return init_random_dinov3(tmp_path_factory.mktemp("enc") / "dinov3-tiny", preset="tiny", seed=0)


def _ingest(root: Path, out: Path, **kw) -> Path:
    from pipeline.ingest import run_ingest
    from pipeline.ingest_config import IngestConfig

    run_ingest(IngestConfig(source=root.name, root=root, repo_id=f"local/{root.name}", out=out, **kw))
    return out


@pytest.fixture(scope="session")
def multicam_manifest(multicam_root, tmp_path_factory) -> Path:
    return _ingest(multicam_root, tmp_path_factory.mktemp("manifests") / "multicam.parquet", val_fraction=0.4)


@pytest.fixture(scope="session")
def pusht_manifest(pusht_root, tmp_path_factory) -> Path:
    return _ingest(pusht_root, tmp_path_factory.mktemp("manifests") / "pusht.parquet", val_fraction=0.34)


@pytest.fixture(scope="session")
def pusht_free_manifest(pusht_free_root, tmp_path_factory) -> Path:
    return _ingest(pusht_free_root, tmp_path_factory.mktemp("manifests") / "pusht-free.parquet", val_fraction=0.34)


@pytest.fixture(scope="session")
def pusht_store(tmp_path_factory, pusht_manifest, pusht_free_manifest, tiny_encoder) -> Path:
    """Labelled + action-free pusht tokens (64x64 frames: a 4x4 grid of width-32 tokens)."""
    from featurestore.encode import EncodeConfig, run_encode
    from featurestore.encoders import Preprocess
    from featurestore.store import StoreLayout

    store = tmp_path_factory.mktemp("stores") / "pusht.zarr"
    for manifest in (pusht_manifest, pusht_free_manifest):
        run_encode(EncodeConfig(manifest=manifest, store=store, encoder=str(tiny_encoder),
                                preprocess=Preprocess(height=64, width=64), layout=StoreLayout(episodes_per_segment=4),
                                batch_size=16, threads=1))
    return store


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, pusht_store) -> Path:
    """A tiny shortcut model trained for a few steps on pusht_store (labelled + action-free)."""
    import dataclasses

    from trainer.config import tiny
    from trainer.loop import run_train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_train(dataclasses.replace(tiny(), store=pusht_store, out=out, steps=30, labelled_fraction=0.5,
                                  action_mode="relative_to_state", context_frames=6))
    return out
