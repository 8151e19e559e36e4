"""What users write by hand, fuzzed with a seeded generator: each case is a clear UserError or a correct value,
never a traceback. 600 cases per input kind (registry TOML, --set, --image-size/--grid, --shard, --horizons)."""

from __future__ import annotations

import random
import string

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
