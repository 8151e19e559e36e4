"""Sharing a model: `export_run` writes a folder with no path of this machine in it; copied elsewhere (the run
deleted) it loads, as a folder or as a Hub id in the Hugging Face cache, and rolls out bit for bit as the run did;
its model card carries the eval table; `push_to_hub` refuses offline and uploads only the export's files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from pipeline.stage import UserError
from trainer.api import LoadedWorldModel
from trainer.config import tiny
from trainer.eval import EvalConfig, run_eval
from trainer.export import FILES, ExportedModel, export_run, push_to_hub, upload_files
from trainer.loop import run_train


@pytest.fixture(scope="module")
def trained(pusht_store, tmp_path_factory):
    """A tiny run, evaluated into its folder, and what it rolls out before it is exported (then deleted)."""
    root = tmp_path_factory.mktemp("export")
    cfg = dataclasses.replace(tiny(), store=pusht_store, out=root / "run", steps=10, ckpt_every=10, eval_every=10,
                              labelled_fraction=0.5, tracker="none")
    run = run_train(cfg).run_dir
    result = run_eval(EvalConfig(ckpt=run, horizons=(1, 3), windows_per_episode=2, probe=False, samples=2,
                                 k_sweep=(1, 2), plots=False, tracker="none"))
    wm = LoadedWorldModel.load(run)
    return {"root": root, "run": run, "eval": result, "rollouts": _rollouts(wm), "shape": wm.shape,
            "stats": wm.stats, "encoder": wm.encoder}


def _rollouts(wm: LoadedWorldModel) -> dict[str, torch.Tensor]:
    """Rollouts from fixed inputs: the batched one (eval's) and the planner's (the context committed once)."""
    g = torch.Generator().manual_seed(0)
    T, H, N, Z = 3, 4, wm.shape.tokens, wm.shape.enc_dim
    context = torch.randn(1, T, N, Z, generator=g)
    actions = torch.randn(2, T + H, wm.actions.frame_dim, generator=g)
    plan = wm.planning_rollout(context[0], seed=3)
    return {"rollout": wm.rollout(context, actions, horizon=H, generator=torch.Generator().manual_seed(1)),
            "plan": plan(torch.randn(5, H, wm.actions.frame_dim, generator=g))}


@pytest.fixture(scope="module")
def shared(trained):
    """The export, copied to another folder, the run and the first export deleted."""
    first = export_run(trained["run"], trained["root"] / "tiny-wm")
    elsewhere = trained["root"] / "elsewhere" / "tiny-wm"
    shutil.copytree(first, elsewhere)
    shutil.rmtree(first)
    shutil.rmtree(trained["run"])
    return elsewhere


def test_the_export_has_its_files_and_no_path_of_this_machine(shared, trained, pusht_store):
    assert sorted(p.name for p in shared.iterdir()) == sorted(FILES)
    for f in shared.iterdir():
        data = f.read_bytes()
        for place in (trained["root"], pusht_store.parent, Path("/tmp")):
            assert str(place).encode() not in data, (f.name, place)
    config = json.loads((shared / "config.json").read_text())
    assert config["format"] == "wmctl-world-model" and config["step"] == 10 and config["weights"] == "ema"
    assert config["config"]["store"] == pusht_store.name and config["config"]["out"] is None
    assert config["action_space"]["frame_dim"] == trained["shape"].action_dim
    encoder = json.loads((shared / "encoder.json").read_text())
    assert encoder["weights_sha256"] == trained["encoder"]["weights_sha256"]


def test_the_copied_export_rolls_out_bit_for_bit_as_the_run_did(shared, trained, pusht_store):
    from featurestore.encoders import check_same_encoder
    from featurestore.reader import TokenReader

    wm = LoadedWorldModel.load(shared, store=pusht_store)
    again = _rollouts(wm)
    for key, before in trained["rollouts"].items():
        assert torch.equal(again[key], before), key
    assert wm.step == 10 and wm.name == "tiny-wm/step-00000010" and wm.store == pusht_store
    assert wm.shape == trained["shape"]
    for f in dataclasses.fields(wm.stats):
        assert (getattr(wm.stats, f.name) == getattr(trained["stats"], f.name)).all(), f.name
    check_same_encoder(wm.encoder, TokenReader(wm.store).encoder, what="the export", fix="-")  # the store fits
    bare = LoadedWorldModel.load(shared)  # a command that needs a store is told to pass one
    with pytest.raises(UserError, match="tiny-wm/step-00000010 is an exported model: it names no token store; "
                                        "pass --store STORE"):
        TokenReader(bare.store)
    with pytest.raises(UserError, match="holds its ema weights only"):
        LoadedWorldModel.load(shared, weights="model")


def test_the_model_card_lists_the_eval_figures(shared, trained):
    card = (shared / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: wmctl\n")
    result = trained["eval"]
    entry = result.conditions["actions"]
    assert "### actions\n\n| horizon | model | copy-last |" in card
    for h in (1, 3):
        row = f"| {h} | {entry[result.model]['mse'][h]:.4g} | {entry['copy_last']['mse'][h]:.4g} |"
        assert row in card, row
    assert "### null action" in card and 'LoadedWorldModel.load("tiny-wm", store="tokens.zarr")' in card


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(shared, trained, pusht_store, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--tiny-wm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    shutil.copytree(shared, repo / "snapshots" / ("a" * 40))  # what `hf download someone/tiny-wm` leaves
    wm = LoadedWorldModel.load("someone/tiny-wm", store=pusht_store)
    assert torch.equal(_rollouts(wm)["rollout"], trained["rollouts"]["rollout"])
    with pytest.raises(UserError, match="no Hub model of that id in the Hugging Face cache .*`hf download "
                                        "someone/other-wm`"):
        LoadedWorldModel.load("someone/other-wm")


def test_push_to_hub_refuses_offline_and_uploads_only_the_export(shared, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set \(no network\).*hf auth login.*`hf upload "
                                        "someone/tiny-wm "):
        push_to_hub(shared, "someone/tiny-wm")  # the tests run offline (conftest)
    folder = tmp_path / "with-notes"
    shutil.copytree(shared, folder)
    (folder / "notes.txt").write_text("not part of the model")
    assert upload_files(folder) == list(FILES)
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kw):
            calls.append(("create_repo", repo, kw))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    import huggingface_hub

    monkeypatch.setattr("trainer.export.hub_offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(folder, "someone/tiny-wm", private=True) == "https://huggingface.co/someone/tiny-wm"
    assert calls[0] == ("create_repo", "someone/tiny-wm", {"private": True, "exist_ok": True})
    assert calls[1][1]["allow_patterns"] == list(FILES) and calls[1][1]["folder_path"] == str(folder)
    with pytest.raises(UserError, match="is not a wmctl model export"):
        upload_files(tmp_path)


def test_export_command_refuses_a_folder_in_use_and_replaces_an_export_with_force(tmp_path, pusht_store):
    from trainer.cli_export import export

    run = run_train(dataclasses.replace(tiny(), store=pusht_store, out=tmp_path / "run", steps=2, tracker="none",
                                        eval_every=100)).run_dir
    app = typer.Typer()
    app.command()(export)
    app.command("unused")(lambda: None)  # two commands: the first is invoked by name
    out = tmp_path / "model"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert f"exported {run} to {out}" in r.output and ExportedModel.read(out).step == 2
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert isinstance(r.exception, UserError) and "an earlier export: pass --force" in str(r.exception)
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--force", "--push-to-hub", "someone/x"])
    assert isinstance(r.exception, UserError) and "HF_HUB_OFFLINE is set" in str(r.exception)
    assert ExportedModel.read(out).step == 2  # replaced, then the push refused offline
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty: choose a new folder"):
        export_run(run, tmp_path / "notes")
