"""What the operating system refuses, and damaged files, end in one line that names the path and the fix, with the
exit code the README gives (2 the user acts: the path given is wrong, a file is damaged; 4 the machine failed: disk
full, read-only, permission denied), never a traceback; nothing half written is committed, and the same command
completes once the cause is gone. Real commands (CliRunner, subprocesses), real files; the disk-full and read-only
cases on a size-limited tmpfs mounted here when this runs as root (as CI does), else with the error injected into
the writes under the folder. Also: files follow the umask; `plan sim` keeps the strips of a kept result, keeps its
finished trials over a SIGTERM and resumes from them.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zarr
from synthetic import write_token_world
from typer.testing import CliRunner

from pipeline.cli import app


# ------------------------------------------------------------------------------------------------------ helpers
def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r, code: int, *needles: str) -> str:
    """The one `error:` line of a command that exited with `code` and printed no traceback; it holds `needles`."""
    out = r.output if hasattr(r, "output") else r.stdout + r.stderr
    got = r.exit_code if hasattr(r, "exit_code") else r.returncode
    assert got == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (relative name -> digest)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def leftovers(path: Path) -> list[Path]:
    """Half-written files a writer would have left: temporaries, staging groups, checkpoints in progress."""
    return [p for p in Path(path).rglob("*") if ".partial" in p.name or p.name.startswith(".step-")
            or (p.parent.name == "staging" and p.is_dir())]


@functools.cache
def can_mount() -> bool:
    """Root with a working `mount -t tmpfs` (and not told otherwise by WMCTL_TEST_NO_MOUNT=1)."""
    if os.environ.get("WMCTL_TEST_NO_MOUNT") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="wmctl-mnt-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
        if ok.returncode == 0:
            subprocess.run(["umount", str(d)], check=True)
        return ok.returncode == 0
    finally:
        d.rmdir()


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """A filler file that leaves about `leave_bytes` free on the file system of `path`."""
    filler = path / "FILLER"
    st = os.statvfs(path)
    want = max(0, st.f_bavail * st.f_frsize - leave_bytes)
    with open(filler, "wb") as f:
        try:
            while want > 0:
                n = min(want, 1 << 16)
                f.write(b"\0" * n)
                want -= n
            f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def inject(monkeypatch, folder: Path, code: int) -> None:
    """Writes (and folders made) under `folder` fail with `code`, in this process: what a full disk, a read-only file
    system or a folder without permission does to Python's writers (lerobot's and torch's own C writers excepted)."""
    root = str(Path(folder).resolve())
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir

    def under(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)

    def refuse(p):
        raise OSError(code, os.strerror(code), os.fsdecode(p))

    def io_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            refuse(path)
        return real_mkdir(path, *a, **k)

    for mod, name, fn in ((io, "open", io_open), (builtins, "open", io_open), (os, "open", os_open),
                          (os, "mkdir", mkdir)):
        monkeypatch.setattr(mod, name, fn)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """(folder on a full disk, free()): a 1 MB tmpfs filled up, else a folder whose writes fail with ENOSPC."""
    d = tmp_path / "full"
    if can_mount():
        with tmpfs(d, 1024):
            filler = fill(d)
            yield d, filler.unlink
    else:
        d.mkdir()
        inject(monkeypatch, d, errno.ENOSPC)
        yield d, monkeypatch.undo


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on a read-only file system (a tmpfs remounted ro, else EROFS injected)."""
    d = tmp_path / "ro"
    if can_mount():
        with tmpfs(d, 256):
            remount(d, "ro")
            yield d
    else:
        d.mkdir()
        inject(monkeypatch, d, errno.EROFS)
        yield d


@pytest.fixture
def no_access(tmp_path, monkeypatch):
    """A folder this user may not write: mode 0555, or for root (who may write anyway) EACCES injected."""
    d = tmp_path / "locked"
    d.mkdir()
    if os.geteuid() == 0:
        inject(monkeypatch, d, errno.EACCES)
        yield d
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_token_world(tmp_path_factory.mktemp("w") / "w.zarr")


@pytest.fixture
def commands(pusht_root, pusht_manifest, tiny_encoder, world):
    """The command line of each stage, writing to `out`."""
    return {
        "ingest": lambda out: ["ingest", "--root", pusht_root, "--out", out / "m.parquet", "--val-fraction", "0.34"],
        "encode": lambda out: ["encode", "--manifest", pusht_manifest, "--store", out / "s.zarr", "--encoder",
                               tiny_encoder, "--image-size", "64", "--batch-size", "16", "--threads", "1",
                               "--episodes-per-segment", "2"],
        "train": lambda out: ["train", "--store", world, "--preset", "tiny", "--steps", "2", "--out", out / "run",
                              "--tracker", "none"],
        "data": lambda out: ["data", "pusht", "--out", out / "d", "--episodes", "1", "--frames-per-episode", "6"],
    }


STAGES = ["ingest", "encode", "train", "data"]


# ------------------------------------------------------------------------------------- 8: the machine refuses
@pytest.mark.parametrize("stage", STAGES)
def test_a_full_disk_is_one_line_exit_4_then_the_same_command_completes(stage, commands, full_disk):
    folder, free = full_disk
    r = invoke(*commands[stage](folder))
    one_error_line(r, 4, "no space left", str(folder), "Free space")
    assert not leftovers(folder)  # nothing half written is left, let alone committed
    free()
    r = invoke(*commands[stage](folder))
    assert r.exit_code == 0, r.output[-3000:]


@pytest.mark.parametrize("stage", STAGES)
def test_a_read_only_file_system_is_one_line_exit_4(stage, commands, read_only):
    one_error_line(invoke(*commands[stage](read_only)), 4, "read-only file system", str(read_only), "writable")


@pytest.mark.parametrize("stage", STAGES)
def test_a_folder_without_write_permission_is_one_line_exit_4(stage, commands, no_access):
    one_error_line(invoke(*commands[stage](no_access)), 4, "permission denied", str(no_access))


@pytest.mark.parametrize("kind", ["ENAMETOOLONG", "ELOOP", "ENOTDIR"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_path_the_system_refuses_as_given_is_one_line_exit_2(stage, kind, commands, tmp_path):
    if kind == "ENAMETOOLONG":
        out, needle = tmp_path / ("n" * 300), "too long"
    elif kind == "ELOOP":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out, needle = tmp_path / "loop", "link loop"
    else:
        (tmp_path / "afile").write_text("a file, not a folder")
        out, needle = tmp_path / "afile", "a file where a folder is expected"
    one_error_line(invoke(*commands[stage](out)), 2, needle, str(tmp_path))


def test_an_os_error_folded_into_a_library_error_still_maps_and_a_crash_is_exit_5(monkeypatch):
    import pipeline.cli.ingest as cli_ingest

    def disk_full():  # what safetensors raises on a full disk (its Rust I/O error, not an OSError)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cli_ingest, "available", disk_full)
    one_error_line(invoke("datasets"), 4, "no space left")

    def bug():
        return 1 / 0

    monkeypatch.setattr(cli_ingest, "available", bug)
    r = invoke("datasets")
    assert r.exit_code == 5 and "ZeroDivisionError" in r.output  # a bug: never exit 1 ("some episodes failed")
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


# ------------------------------------------------------------------------------------- 9: damaged zarr.json
@pytest.fixture(scope="module")
def encoded(tmp_path_factory, pusht_manifest, tiny_encoder) -> Path:
    """A pristine store of the pusht manifest (3 segments of 2 episodes), copied by each test that damages it."""
    store = tmp_path_factory.mktemp("enc") / "s.zarr"
    r = invoke("encode", "--manifest", pusht_manifest, "--store", store, "--encoder", tiny_encoder, "--image-size",
               "64", "--batch-size", "16", "--threads", "1", "--episodes-per-segment", "2")
    assert r.exit_code == 0, r.output
    return store


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "not JSON": lambda b: b"\x00\xff garbage \x89PNG" * 4,
    "wrong types": None,  # valid JSON, the episode table's fields of the wrong type
}


def damage(file: Path, how: str, key: str) -> None:
    if DAMAGE[how] is not None:
        file.write_bytes(DAMAGE[how](file.read_bytes()))
        return
    meta = json.loads(file.read_text())
    if key == "wmctl_segment":
        meta["attributes"][key]["frames"] = "twelve"
        meta["attributes"][key]["episodes"] = {"0": "x"}
    else:
        meta["attributes"][key]["layout"] = ["float16"]
    file.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_segment_zarr_json_is_named_and_encode_repair_rewrites_it(how, encoded, pusht_manifest,
                                                                           tiny_encoder, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(encoded, store)
    seg = sorted((store / "sources" / "pusht" / "segments").iterdir())[1]
    meta = seg / "zarr.json"
    damage(meta, how, "wmctl_segment")
    r = invoke("status", "--store", store, "--verify")
    assert r.exit_code == 1 and f"damaged: pusht/{seg.name}" in r.output and str(meta) in r.output, r.output
    assert invoke("status", "--store", store).exit_code == 0  # the rest is still listed
    one_error_line(invoke("train", "--store", store, "--preset", "tiny", "--steps", "1", "--out", tmp_path / "run"),
                   2, str(meta), "--repair")  # every reader names the file and the fix
    enc = ["encode", "--manifest", pusht_manifest, "--store", store, "--encoder", tiny_encoder, "--image-size", "64",
           "--batch-size", "16", "--threads", "1", "--episodes-per-segment", "2"]
    one_error_line(invoke(*enc), 2, str(meta), "--repair")
    r = invoke(*enc, "--repair")
    assert r.exit_code == 0 and "committed 1 segment(s)" in r.output, r.output
    assert invoke("status", "--store", store, "--verify").exit_code == 0
    fresh, pristine = tree_digest(store), tree_digest(encoded)
    assert {k for k in pristine if fresh.get(k) != pristine[k] and not k.endswith("zarr.json")} == set()
    assert json.loads(meta.read_text())["attributes"]["wmctl_segment"]["episodes"] == \
        json.loads((encoded / meta.relative_to(store)).read_text())["attributes"]["wmctl_segment"]["episodes"]


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_root_zarr_json_is_exit_2_naming_the_file(how, encoded, pusht_manifest, tiny_encoder, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(encoded, store)
    damage(store / "zarr.json", how, "wmctl_token_store")
    for args in (["status", "--store", store, "--verify"],
                 ["train", "--store", store, "--preset", "tiny", "--steps", "1", "--out", tmp_path / "run"],
                 ["encode", "--manifest", pusht_manifest, "--store", store, "--encoder", tiny_encoder,
                  "--image-size", "64"]):
        one_error_line(invoke(*args), 2, str(store / "zarr.json"), "damaged")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 12: say what it is, validate
def test_encode_into_a_file_or_a_symlink_loop_says_what_it_is(commands, tmp_path):
    (tmp_path / "s.zarr").write_text("not a store")
    line = one_error_line(invoke(*commands["encode"](tmp_path)), 2, str(tmp_path / "s.zarr"), "is a file")
    assert "another process" not in line
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "s.zarr").symlink_to(loop / "s.zarr")
    line = one_error_line(invoke(*commands["encode"](loop)), 2, str(loop / "s.zarr"), "link loop")
    assert "another process" not in line


@pytest.fixture(scope="module")
def short_decoder(pusht_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dec") / "decoder"
    r = invoke("decoder", "train", "--store", pusht_store, "--steps", "21", "--max-frames", "24", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_decoder_train_takes_few_steps_and_refuses_none(pusht_store, tmp_path):
    for steps in ("20", "1"):  # 20 and below: torch's OneCycleLR divided by its warm-up of zero steps
        r = invoke("decoder", "train", "--store", pusht_store, "--steps", steps, "--max-frames", "24", "--out",
                   tmp_path / steps)
        assert r.exit_code == 0, r.output
        assert (tmp_path / steps / "decoder.safetensors").is_file()
    for steps in ("0", "-3"):
        one_error_line(invoke("decoder", "train", "--store", pusht_store, "--steps", steps, "--out", tmp_path / "d"),
                       2, f"--steps {steps}")
    one_error_line(invoke("decoder", "train", "--store", pusht_store, "--camera", "3", "--out", tmp_path / "d"), 2,
                   "--camera 3")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("how", ["truncated weights", "foreign weights", "meta not JSON", "meta wrong types"])
def test_a_damaged_decoder_is_named_by_visualize(how, short_decoder, tiny_run, tmp_path):
    dec = tmp_path / "decoder"
    shutil.copytree(short_decoder, dec)
    weights, meta = dec / "decoder.safetensors", dec / "decoder.json"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
        file = weights
    elif how == "foreign weights":
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, weights)
        file = weights
    elif how == "meta not JSON":
        meta.write_bytes(b"{\"enc_dim\": 3")
        file = meta
    else:
        m = json.loads(meta.read_text())
        m["grid"] = "4x4"
        meta.write_text(json.dumps(m))
        file = meta
    r = invoke("visualize", "--run", tiny_run, "--decoder", dec, "--out", tmp_path / "v.png", "--horizon", "2")
    one_error_line(r, 2, str(file), "damaged", "decoder train")
    assert not (tmp_path / "v.png").exists()


def test_the_registry_lists_what_it_can_warns_of_what_is_not_a_folder_and_refuses_escaping_repo_ids(
        tmp_path, monkeypatch, caplog, pusht_root):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "latin1.toml").write_bytes('repo_id = "me/caf\xe9"\n'.encode("latin-1"))
    (reg / "folder.toml").mkdir()
    (reg / "good.toml").write_text(f'repo_id = "me/good"\nroot = "{pusht_root}"\n')
    (reg / "evil.toml").write_text('repo_id = "../../outside"\n')
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("WMCTL_REGISTRY", f"{tmp_path / 'not-a-folder'}:{reg}")
    monkeypatch.setenv("COLUMNS", "400")
    with caplog.at_level("WARNING"):
        r = invoke("datasets")
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): line for line in r.output.splitlines() if line.count("│") > 3}
    assert "me/good" in rows["good"] and "pusht-demo" in rows  # the rest is listed
    for name, why in (("latin1", "not UTF-8"), ("folder", "is a folder"), ("evil", "not a repo id")):
        assert "unreadable" in rows[name] and why in rows[name], rows[name]
    assert f"WMCTL_REGISTRY entry {tmp_path / 'not-a-folder'} is not a folder" in caplog.text
    r = invoke("ingest", "--dataset", "evil", "--out", tmp_path / "m.parquet")
    one_error_line(r, 2, str(reg / "evil.toml"), "`repo_id`", "../../outside", "not a repo id")


# ------------------------------------------------------------------------------------------------ 14: umask
def modes(path: Path) -> set[tuple[str, int]]:
    """(kind, permission bits) of every file and folder under `path` (and of `path`)."""
    found = [Path(path), *Path(path).rglob("*")]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in found}


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_file_written_follows_the_umask(umask, pusht_root, tiny_encoder, tiny_run, tmp_path):
    """What ingest, encode, train (but its checkpoints' weights: see the next test), decoder train and plan sim
    write: 0o666 / 0o777 less the umask, not mkstemp's 0600."""
    old = os.umask(umask)
    try:
        runs = [["ingest", "--root", pusht_root, "--out", tmp_path / "m" / "m.parquet", "--val-fraction", "0.34"],
                ["encode", "--manifest", tmp_path / "m" / "m.parquet", "--store", tmp_path / "s.zarr", "--encoder",
                 tiny_encoder, "--image-size", "64", "--batch-size", "16", "--threads", "1"],
                ["train", "--store", tmp_path / "s.zarr", "--preset", "tiny", "--steps", "2", "--out",
                 tmp_path / "run", "--tracker", "none"],
                ["decoder", "train", "--store", tmp_path / "s.zarr", "--steps", "2", "--max-frames", "8", "--out",
                 tmp_path / "dec"],
                ["plan", "sim", "--run", tiny_run, "--episodes", "1", "--goal-offset", "4", "--max-steps", "2",
                 "--horizon", "2", "--execute", "1", "--samples", "8", "--elites", "2", "--iterations", "2",
                 "--out", tmp_path / "sim"]]
        for args in runs:
            r = invoke(*args)
            assert r.exit_code == 0, r.output[-3000:]
    finally:
        os.umask(old)
    for out in ("m", "s.zarr", "dec", "sim"):
        assert modes(tmp_path / out) <= {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}, out
    run = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")
           if p.is_file() and p.suffix != ".safetensors"}
    assert set(run.values()) == {0o666 & ~umask}, run
    assert len(list((tmp_path / "sim").glob("trial_*.png"))) == 1


def test_checkpoint_weights_follow_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        r = invoke("train", "--store", world, "--preset", "tiny", "--steps", "1", "--out", tmp_path / "run",
                   "--tracker", "none")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert modes(tmp_path / "run") <= {("dir", 0o755), ("file", 0o644)}


# ------------------------------------------------------------------------------------- 5 and 16: plan sim
SIM = ["plan", "sim", "--goal-offset", "4", "--max-steps", "2", "--horizon", "2", "--execute", "1", "--samples", "8",
       "--elites", "2", "--iterations", "2"]


def test_a_kept_sim_result_keeps_its_strips_and_a_replaced_one_loses_only_its_own(tiny_run, tmp_path):
    out = tmp_path / "sim"
    base = [*SIM, "--run", tiny_run, "--episodes", "2", "--out", out]
    assert invoke(*base, "--k", "1").exit_code == 0
    first = json.loads((out / "sim.json").read_text())
    assert len(first["strips"]) == 2
    pictures = {Path(s).name: Path(s).read_bytes() for s in first["strips"]}
    r = invoke(*base, "--k", "2")  # another configuration into the same folder: the first is kept beside it
    assert r.exit_code == 0, r.output
    (kept,) = out.glob("sim-*.json")
    kept_strips = json.loads(kept.read_text())["strips"]
    new_strips = json.loads((out / "sim.json").read_text())["strips"]
    assert not set(kept_strips) & set(new_strips)
    assert {Path(s).name: Path(s).read_bytes() for s in kept_strips} == pictures  # the kept result's own pictures
    assert all(Path(s).is_file() for s in new_strips)
    r = invoke(*base, "--k", "2")  # the same configuration again: replaces its own result and strips only
    assert r.exit_code == 0, r.output
    assert all(Path(s).is_file() for s in kept_strips)
    assert sorted(p.name for p in out.glob("trial_*.png")) == sorted(Path(s).name for s in new_strips)
    assert not list(out.glob("sim.partial*"))


def _sim_subprocess(run: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WMCTL_FAULT"}
    if fault:
        env["WMCTL_FAULT"] = fault
    args = [*SIM, "--run", str(run), "--episodes", "3", "--out", str(out)]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True)


def _outcomes(res: dict) -> dict:
    """Every trial's outcome, without the plan latencies and the control loop's seconds (wall-clock time)."""
    return {p: [{k: v for k, v in t.items() if k not in ("plan_s", "loop_s")} for t in res[p]["per_trial"]]
            for p in ("model", "random")}


@pytest.fixture(scope="module")
def uninterrupted_sim(tiny_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("simref") / "sim"
    r = _sim_subprocess(tiny_run, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "sim.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sim-trial:2:TERM", "sim-trial:4"])
def test_plan_sim_stopped_keeps_its_finished_trials_and_resumes_to_the_uninterrupted_result(
        fault, tiny_run, uninterrupted_sim, tmp_path):
    """SIGTERM after the 2nd trial (a clean stop: exit 3, the count kept said), SIGKILL after the 4th (of 3 model
    and 3 random trials); then the same command, which must end where an uninterrupted run does."""
    out = tmp_path / "sim"
    stopped = _sim_subprocess(tiny_run, out, fault)
    partial = out / "sim.partial.jsonl"
    kept = len(partial.read_text().splitlines()) - 1
    if "TERM" in fault:
        assert stopped.returncode == 3, stopped.stderr[-3000:]
        assert "2 of 6 trials finished and kept" in stopped.stderr and "Traceback" not in stopped.stderr
        assert kept == 2
    else:
        assert stopped.returncode == -9 and kept == 4
    assert not (out / "sim.json").exists()
    resumed = _sim_subprocess(tiny_run, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{kept} finished trials kept" in resumed.stderr
    res = json.loads((out / "sim.json").read_text())
    assert _outcomes(res) == _outcomes(uninterrupted_sim)
    for p in ("model", "random"):
        assert res[p]["success_rate"] == uninterrupted_sim[p]["success_rate"]
    assert not partial.exists() and not (out / "sim.partial-strips").exists()
    assert len(res["strips"]) == 3 and all(Path(s).is_file() for s in res["strips"])


# ----------------------------------------------------------------------------------- the store's own writes
def test_a_segment_writer_that_cannot_create_its_arrays_leaves_no_staging(world, tmp_path, monkeypatch):
    from featurestore.store import TokenStore

    store = tmp_path / "w.zarr"
    shutil.copytree(world, store)
    before = tree_digest(store / "sources" / "world" / "segments")
    ts = TokenStore.open_existing(store)

    def disk_full(self, name, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zarr.Group, "create_array", disk_full)  # after its staging group was made
    with pytest.raises(OSError, match="No space left"):
        ts.begin_segment("world", "v0-b000099", frames=4, cameras=1, tokens=4, dim=8, action_dim=2, state_dim=2)
    monkeypatch.undo()
    assert not [p for p in (store / "sources" / "world" / "staging").iterdir() if p.is_dir()]
    assert tree_digest(store / "sources" / "world" / "segments") == before
