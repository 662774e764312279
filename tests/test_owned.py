"""Users' files are sacred: tunelab deletes or replaces only what it can prove it wrote (owned.py),
refuses dangerous targets, and hostile or corrupt weights end in one line naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import tunelab
from tests.test_cli import cli
from tests.test_train_loop import run_cfg
from tunelab import owned

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path, **files: str) -> dict[str, bytes]:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return snapshot(path)


def refused(code: int, err: str, *names: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return code == 2 and "Traceback" not in err and len(lines) <= 2 and all(n in lines[0] for n in names)


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir, chat_data) -> Path:
    out = tmp_path_factory.mktemp("owned") / "run"
    assert tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=2), quiet=True).status == "completed"
    return out


def train_cli(capsys, llama_dir, chat_data, out: Path, *flags: str) -> tuple[int, str, str]:
    cfg = Path(tempfile.mkdtemp()) / "cfg.json"  # outside `out`, wherever that is
    cfg.write_text(json.dumps(run_cfg(llama_dir, chat_data, out, max_steps=2)))
    return cli(capsys, "train", "-q", str(cfg), *flags)  # YAML reads JSON


# ----------------------------------------------------------------------------- export


def test_export_into_a_users_folder_is_refused_and_nothing_is_touched(run, tmp_path, capsys):
    before = user_folder(tmp_path / "victim", thesis__txt="my thesis")
    code, _, err = cli(capsys, "export", str(run), "--out", str(tmp_path / "victim"))
    assert refused(code, err, str(tmp_path / "victim"), "did not write")
    assert "--force" in err
    assert snapshot(tmp_path / "victim") == before
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]  # no staging folder left beside it


def test_force_writes_beside_the_users_files_and_never_replaces_one(run, tmp_path, capsys):
    victim = tmp_path / "victim"
    before = user_folder(victim, thesis__txt="my thesis")
    code, _, err = cli(capsys, "export", str(run), "--out", str(victim), "--force")
    assert code == 0, err
    assert (victim / "adapter_model.safetensors").is_file() and (victim / owned.MARKER).is_file()
    assert (victim / "thesis.txt").read_bytes() == before["thesis.txt"]
    # a re-export replaces the previous export's files and keeps the user's
    code, _, err = cli(capsys, "export", str(run), "--out", str(victim), "--merge", "--force")
    assert code == 0, err
    assert (victim / "model.safetensors").is_file() and not (victim / "adapter_model.safetensors").exists()
    assert (victim / "thesis.txt").read_bytes() == before["thesis.txt"]
    # a file of the user's with a name the export would write is never replaced
    other = tmp_path / "other"
    before = user_folder(other, README__md="my readme", notes__txt="x")
    code, _, err = cli(capsys, "export", str(run), "--out", str(other), "--force")
    assert refused(code, err, "README.md", "would be replaced")
    assert snapshot(other) == before


def test_a_second_export_replaces_only_the_previous_export(run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert cli(capsys, "export", str(run), "--out", str(out), "--merge")[0] == 0
    assert (out / "model.safetensors").is_file()
    assert cli(capsys, "export", str(run), "--out", str(out))[0] == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    marker = json.loads((out / owned.MARKER).read_text())
    assert marker["kind"] == "export" and set(marker["entries"]) == {p.name for p in out.iterdir()} - {owned.MARKER}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no .tmp / .old left
    tunelab.load(out)  # still a plain adapter folder


KILL_AT = {  # where a subprocess export SIGKILLs itself
    "writing": "import shutil; real = shutil.copytree\n"
               "def copytree(*a, **k):\n    real(*a, **k); os.kill(os.getpid(), signal.SIGKILL)\n"
               "shutil.copytree = copytree",
    "installing": "real = owned.swap\n"
                  "def swap(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\nowned.swap = swap",
}


@pytest.mark.parametrize("where", KILL_AT)
def test_a_killed_export_leaves_the_previous_export_intact(run, tmp_path, capsys, where):
    out = tmp_path / "exp"
    assert cli(capsys, "export", str(run), "--out", str(out))[0] == 0
    before = snapshot(out)
    code = (f"import os, signal, sys\nfrom tunelab import owned, api\n{KILL_AT[where]}\n"
            f"api.export({str(run)!r}, {str(out)!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert snapshot(out) == before
    assert cli(capsys, "export", str(run), "--out", str(out))[0] == 0  # and the next export succeeds


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_swap_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(owned, "_exchange", lambda a, b: False)
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    owned.swap(new, old)
    assert snapshot(old) == {"b": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- train --overwrite / --force


def test_overwrite_of_a_users_folder_is_refused(llama_dir, chat_data, tmp_path, capsys):
    notes = tmp_path / "notes"
    before = user_folder(notes, notes__txt="x", config__yaml="a: 1\n")
    code, _, err = train_cli(capsys, llama_dir, chat_data, notes, "--overwrite")
    assert refused(code, err, str(notes), "did not write")
    assert snapshot(notes) == before


def test_force_trains_beside_the_users_files_and_overwrite_keeps_them(llama_dir, chat_data, tmp_path, capsys):
    notes = tmp_path / "notes"
    before = user_folder(notes, notes__txt="x", data__csv="1,2\n")
    code, _, err = train_cli(capsys, llama_dir, chat_data, notes, "--force")
    assert code == 0, err
    assert (notes / "final").is_dir() and (notes / "config.yaml").is_file()
    stale = notes / "checkpoints" / "stale-marker"
    stale.write_text("from the first run")
    code, _, err = train_cli(capsys, llama_dir, chat_data, notes, "--overwrite")
    assert code == 0, err
    assert not stale.exists() and (notes / "final").is_dir()
    assert {k: v for k, v in snapshot(notes).items() if k in before} == before
    # a name the run writes that is the user's: refused even with --force
    clash = tmp_path / "clash"
    before = user_folder(clash, config__yaml="mine: 1\n")
    code, _, err = train_cli(capsys, llama_dir, chat_data, clash, "--force")
    assert refused(code, err, "config.yaml", "would be replaced")
    assert snapshot(clash) == before


def test_overwrite_of_own_run_starts_over(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_cli(capsys, llama_dir, chat_data, out)[0] == 0
    code, _, err = train_cli(capsys, llama_dir, chat_data, out)
    assert refused(code, err, "already holds a run")
    assert train_cli(capsys, llama_dir, chat_data, out, "--overwrite")[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1  # the old run's metrics are gone, not appended to


def test_a_run_from_before_markers_can_still_be_overwritten(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_cli(capsys, llama_dir, chat_data, out)[0] == 0
    (out / owned.MARKER).unlink()
    (out / "demo.json").write_text("{}")  # `tunelab demo` writes it into its run
    assert owned.state(out, "run", tunelab.api.RUN_ENTRIES) == "owned"
    assert train_cli(capsys, llama_dir, chat_data, out, "--overwrite")[0] == 0


def test_a_hostile_marker_owns_nothing(tmp_path):
    victim = tmp_path / "v"
    user_folder(victim, keep__txt="x")
    for entries in (["../v"], ["/etc"], ["a/b"], [".."], "keep.txt", [1]):
        (victim / owned.MARKER).write_text(json.dumps({"kind": "export", "entries": entries}))
        assert owned.state(victim, "export") == "foreign"
    (victim / owned.MARKER).write_text("{not json")
    assert owned.state(victim, "export") == "foreign"


# ----------------------------------------------------------------------------- dangerous targets


@pytest.mark.parametrize("target", ["cwd", "above-cwd", "home", "root", "checkout"])
def test_dangerous_targets_are_refused_outright(run, llama_dir, chat_data, tmp_path, capsys, monkeypatch, target):
    home = tmp_path / "home"
    work = home / "project" / "sub"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("x")
    (home / "project" / ".git").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    path = {"cwd": ".", "above-cwd": str(home / "project"), "home": "~", "root": "/", "checkout": str(ROOT)}[target]
    before = snapshot(home)
    code, _, err = cli(capsys, "export", str(run), "--out", path, "--force")
    assert refused(code, err, "tunelab writes only into a folder of its own"), err
    code, _, err = train_cli(capsys, llama_dir, chat_data, Path(path).expanduser(), "--overwrite", "--force")
    assert refused(code, err, "tunelab writes only into a folder of its own"), err
    assert snapshot(home) == before


def test_build_base_refuses_a_users_folder_before_building(tmp_path, capsys):
    before = user_folder(tmp_path / "victim", thesis__txt="my thesis")
    code, _, err = cli(capsys, "world", "build-base", "--out", str(tmp_path / "victim"), "--steps", "1")
    assert refused(code, err, "did not write")
    assert snapshot(tmp_path / "victim") == before
    assert [p.name for p in tmp_path.iterdir()] == ["victim"]


# ----------------------------------------------------------------------------- corrupt and hostile weights


def test_a_truncated_weights_file_is_one_line_naming_it(run, llama_dir, tmp_path, capsys):
    model = tmp_path / "model"
    cli(capsys, "export", str(run), "--merge", "--out", str(model))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = cli(capsys, "generate", str(model), "--prompt", "hi", "--max-new-tokens", "2")
    assert refused(code, err, str(weights), "not a complete safetensors file")
    adapter = tmp_path / "adapter"
    cli(capsys, "export", str(run), "--out", str(adapter))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage")
    code, _, err = cli(capsys, "generate", str(adapter), "--prompt", "hi", "--max-new-tokens", "2")
    assert refused(code, err, "adapter_model.safetensors", "not a complete safetensors file")
    code, _, err = cli(capsys, "export", str(adapter), "--out", str(tmp_path / "again"))
    assert refused(code, err, "adapter_model.safetensors")


def test_a_weights_file_linking_elsewhere_is_refused(run, tmp_path, capsys):
    model = tmp_path / "model"
    cli(capsys, "export", str(run), "--merge", "--out", str(model))
    weights = model / "model.safetensors"
    secret = tmp_path / "secret.safetensors"
    weights.rename(secret)
    os.symlink(secret, weights)
    code, _, err = cli(capsys, "generate", str(model), "--prompt", "hi", "--max-new-tokens", "2")
    assert refused(code, err, str(weights), "outside the model folder")
    code, _, err = cli(capsys, "export", str(model), "--out", str(tmp_path / "copy"))
    assert refused(code, err, str(weights)) and not (tmp_path / "copy").exists()
    inside = model / "weights" / "model.safetensors"  # a link within the folder is fine
    inside.parent.mkdir()
    secret.rename(inside)
    weights.unlink()
    os.symlink(inside, weights)
    assert cli(capsys, "generate", str(model), "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
