"""The install: the lock agrees with pyproject.toml, and the built wheel works outside the checkout
(shipped configs found by name, the embedded base and the demo's recipe inside the package)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

from tunelab.config import SHIPPED_CONFIGS, config_path, shipped_configs
from tunelab.errors import ConfigError
from tunelab.runconfig import load_config

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def declared() -> list[Requirement]:
    """The requirements the lock is made from: the dependencies and the `dev` extra (a superset of the others)."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    assert all(set(reqs) <= set(extras["dev"]) for name, reqs in extras.items()), "every extra must be in dev"
    return [Requirement(r) for r in project["dependencies"] + extras["dev"]]


def locked() -> tuple[dict[str, str], set[str]]:
    """(name -> pinned version, names the lock says it took for tunelab itself)."""
    pins: dict[str, str] = {}
    direct: set[str] = set()
    current = None
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if m := PIN.match(line):
            current = canonicalize_name(m.group(1))
            pins[current] = m.group(2)
        elif current and re.match(r"^\s+#\s+(via\s+)?tunelab \(pyproject.toml\)", line):
            direct.add(current)
    return pins, direct


def test_the_lock_pins_every_declared_requirement_inside_its_range():
    pins, _ = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`")


def test_the_lock_takes_nothing_for_tunelab_that_pyproject_does_not_ask_for():
    _, direct = locked()
    wanted = {canonicalize_name(r.name) for r in declared()}
    assert direct, "the lock no longer says which pins come from pyproject.toml (uv's `# via` lines)"
    assert direct <= wanted, f"{sorted(direct - wanted)}: locked for tunelab but gone from pyproject.toml: make lock"


def test_the_lock_has_hashes_and_names_its_command():
    text = LOCK.read_text(encoding="utf-8")
    assert "make lock" in text.splitlines()[1]
    pins = [line for line in text.splitlines() if PIN.match(line)]
    assert all(line.rstrip().endswith("\\") for line in pins), "every pin carries --hash lines"


def test_the_package_keeps_ranges():
    for req in declared():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{req}: a library must not pin"


# ----------------------------------------------------------------------------- shipped configs by name


def test_a_shipped_config_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert config_path("sft-lora") == SHIPPED_CONFIGS / "sft-lora.yaml"
    assert config_path("sft-lora.yaml") == SHIPPED_CONFIGS / "sft-lora.yaml"
    assert load_config("sft-lora", ["train.max_steps=3"]).train.max_steps == 3
    (tmp_path / "sft-lora.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config("sft-lora.yaml").train.max_steps == 7  # a file of the user's wins


def test_an_unknown_name_lists_the_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        config_path("sft-lorra")
    assert "sft-lora" in e.value.fix and "no such config file" in e.value.message
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("sub/sft-lora.yaml")  # a path is never looked up among the shipped ones


def test_the_checkout_configs_folder_is_the_shipped_one():
    assert (ROOT / "configs").resolve() == SHIPPED_CONFIGS
    assert "sft-lora" in shipped_configs() and "tunelab-tiny" in shipped_configs()


# ----------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("tunelab-*.whl")
    return found


def test_the_wheel_carries_configs_base_model_and_types(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"tunelab/assets/configs/{cfg.name}" in names
    for f in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert f"tunelab/assets/tiny-base/{f}" in names
    assert "tunelab/py.typed" in names
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)


@pytest.mark.slow
def test_the_wheel_runs_outside_the_checkout(wheel, tmp_path):
    """A fresh venv in another folder, with only the wheel installed (the dependencies are borrowed
    from this interpreter's site-packages through a .pth, which runs none of its .pth files, so the
    checkout's editable tunelab stays invisible)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}

    def tunelab(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "tunelab"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = subprocess.check_output([str(py), "-c", "import tunelab; print(tunelab.__file__)"], cwd=work, text=True)
    assert where.startswith(str(site)), where
    assert "--recipe" in tunelab("world", "build-base", "--help")
    tunelab("train", "sft-lora", "train.max_steps=2", "train.eval_every=0", "output.dir=runs/a", "--quiet")
    assert (work / "runs" / "a" / "final").is_dir()
    out = tunelab("demo", "--out", "runs/demo")
    assert "held-out" in out.lower() or "exact" in out.lower(), out
