"""Dataset registry: built-in files resolve; a user adds a dataset by adding a TOML file."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.registry import available, resolve
from pipeline.stage import UserError


def test_builtin_datasets_resolve():
    names = set(available())
    assert {"droid", "pusht-demo", "pusht-free-demo", "multicam-demo"} <= names
    droid = resolve("droid")
    assert droid.repo_id == "lerobot/droid_1.0.1" and not droid.use_actions and len(droid.cameras) == 3
    assert str(droid.resolved_root()).endswith("lerobot/droid_1.0.1")
    assert resolve("pusht-demo").use_actions


def test_user_file_adds_a_dataset_and_is_ingestable(tmp_path, monkeypatch, pusht_root):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "my-arm.toml").write_text(
        f'repo_id = "me/my_arm"\nroot = "{pusht_root}"\nuse_actions = true\nval_fraction = 0.5\n'
    )
    monkeypatch.setenv("WMCTL_REGISTRY", str(reg))
    spec = resolve("my-arm")
    assert spec.root == str(pusht_root) and spec.val_fraction == 0.5
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["ingest", "--dataset", "my-arm", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists()


def test_bad_registry_files_are_named(tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "typo.toml").write_text('repo_id = "x"\nuse_action = true\n')
    monkeypatch.setenv("WMCTL_REGISTRY", str(reg))
    with pytest.raises(UserError, match=r"typo.toml: unknown key\(s\) \['use_action'\]"):
        resolve("typo")
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        resolve("nope")
    (reg / "kind.toml").write_text('repo_id = "x"\naction_kind = ["delta", "absolut"]\n')
    with pytest.raises(UserError, match=r"kind.toml: action_kind \['absolut'\]: each must be one of"):
        resolve("kind")
    (reg / "kind.toml").write_text('repo_id = "x"\naction_kind = 3\n')
    with pytest.raises(UserError, match=r"`action_kind` must be a string or list of strings"):
        resolve("kind")
    assert resolve("multicam-demo").action_kind == ("delta",) * 6 + ("absolute",) * 2
    assert resolve("pusht-demo").action_kind == "absolute"


def test_a_dataset_without_root_is_found_where_the_installed_lerobot_keeps_it(tmp_path, monkeypatch, pusht_root):
    """No `root` in the registry: `$HF_LEROBOT_HOME/<repo_id>` (both stacks), else with lerobot 0.5+ the snapshot a
    Hub download left in its cache (`$HF_LEROBOT_HOME/hub/datasets--org--name/snapshots/<commit>/`, `refs/v3.0`),
    found offline; not there: a clear error naming both places."""
    import shutil

    from pipeline.lerobot_compat import HUB_LAYOUT

    home = tmp_path / "lerobot-home"
    monkeypatch.setenv("HF_LEROBOT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "my-arm.toml").write_text('repo_id = "me/my_arm"\nuse_actions = true\nval_fraction = 0.5\n')
    monkeypatch.setenv("WMCTL_REGISTRY", str(reg))
    ingest = ["ingest", "--dataset", "my-arm", "--out", str(tmp_path / "m.parquet")]
    r = CliRunner().invoke(app, ingest)
    assert r.exit_code == 2 and "is not on this machine" in r.output and str(home / "me/my_arm") in r.output
    if HUB_LAYOUT:
        assert "datasets--me--my_arm" in r.output
        repo = home / "hub" / "datasets--me--my_arm"
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(pusht_root, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "v3.0").write_text(commit)
        assert resolve("my-arm").resolved_root() == repo / "snapshots" / commit
        r = CliRunner().invoke(app, ingest)
        assert r.exit_code == 0, r.output
        (tmp_path / "m.parquet").unlink()
    shutil.copytree(pusht_root, home / "me" / "my_arm")  # a local dataset in $HF_LEROBOT_HOME/<repo_id> comes first
    assert resolve("my-arm").resolved_root() == home / "me" / "my_arm"
    r = CliRunner().invoke(app, ingest)
    assert r.exit_code == 0, r.output


def test_camera_slots_and_embodiment_are_read_and_checked(tmp_path, monkeypatch):
    """`camera_slots` is a TOML table of slot -> camera key (checked against `cameras` when listed: every camera one
    slot, no key twice, no unknown key); `embodiment` a string; the built-in DROID entries name both."""
    droid = resolve("droid")
    assert [s for s, _ in droid.camera_slots] == ["exterior_1", "exterior_2", "wrist"] and droid.embodiment == "franka"
    reg = tmp_path / "reg"
    reg.mkdir()
    monkeypatch.setenv("WMCTL_REGISTRY", str(reg))
    head = 'repo_id = "x"\ncameras = ["cam.front", "cam.wrist"]\n'
    cases = {
        'camera_slots = ["front"]\n': r"`camera_slots` must be a table of strings.*wrist = ",
        'camera_slots = { front = "cam.front", top = "cam.top", wrist = "cam.wrist" }\n':
            r"camera_slots names \['cam.top'\], which are not in `cameras`",
        'camera_slots = { front = "cam.front" }\n': r"cameras \['cam.wrist'\] have no slot in camera_slots",
        'camera_slots = { front = "cam.front", back = "cam.front", wrist = "cam.wrist" }\n':
            r"camera_slots puts \['cam.front'\] in more than one slot",
        'embodiment = 3\n': r"`embodiment` must be a string",
    }
    for body, message in cases.items():
        (reg / "arm.toml").write_text(head + body)
        with pytest.raises(UserError, match=message):
            resolve("arm")
    (reg / "arm.toml").write_text(head + 'embodiment = "ur5"\ncamera_slots = { exterior_1 = "cam.front", '
                                  'wrist = "cam.wrist" }\n')
    spec = resolve("arm")
    assert spec.camera_slots == (("exterior_1", "cam.front"), ("wrist", "cam.wrist")) and spec.embodiment == "ur5"
