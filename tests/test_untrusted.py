"""Files are untrusted: no code runs from a run dir or an artifact, pickle adapters are refused,
and checkpoint / disk / config / data faults end in one line (exit 2) instead of a traceback."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml

import tunelab
from tests.test_cli import cli
from tests.test_train_loop import run_cfg
from tunelab.data.sources import read_records
from tunelab.errors import ConfigError, TunelabError
from tunelab.runconfig import build_config
from tunelab.training import checkpoint

CANARY_CODE = '''
import os, pathlib
pathlib.Path(os.environ["TUNELAB_CANARY"]).write_text("code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CanaryConfig(LlamaConfig):
    model_type = "canarylm"

class CanaryModel(LlamaForCausalLM):
    config_class = CanaryConfig
'''


def one_line(code: int, err: str, *needles: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    return code == 2 and "Traceback" not in err and len(lines) <= 2 and all(n in err for n in needles)


@pytest.fixture(scope="module")
def run(tmp_path_factory, llama_dir, chat_data) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "run"
    assert tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=2), quiet=True).status == "completed"
    return out


@pytest.fixture
def canary(tmp_path, monkeypatch, llama_dir) -> tuple[Path, Path]:
    """A model folder whose config asks for its own code (auto_map), and the file that code writes."""
    model = tmp_path / "custom"
    shutil.copytree(llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="canarylm", auto_map={"AutoConfig": "canary.CanaryConfig",
                                                "AutoModelForCausalLM": "canary.CanaryModel"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "canary.py").write_text(CANARY_CODE)
    fired = tmp_path / "canary-fired"
    monkeypatch.setenv("TUNELAB_CANARY", str(fired))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return model, fired


def shared_run(run: Path, model: Path, dest: Path) -> Path:
    """A copy of `run` as someone might share it: its config turns trust_remote_code on for `model`."""
    shutil.copytree(run, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["model"].update(name_or_path=str(model), trust_remote_code=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    adapter = json.loads((dest / "final" / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(model)
    (dest / "final" / "adapter_config.json").write_text(json.dumps(adapter))
    return dest


def test_a_run_dirs_config_never_runs_code(run, canary, chat_data, tmp_path, capsys):
    model, fired = canary
    shared = shared_run(run, model, tmp_path / "shared")
    code, _, err = cli(capsys, "eval", str(shared), "--data", str(chat_data[1]))
    assert one_line(code, err, "needs its own Python code", "--trust-remote-code") and not fired.exists()
    code, _, err = cli(capsys, "export", str(shared), "--merge", "--out", str(tmp_path / "merged"))
    assert one_line(code, err, "needs its own Python code") and not fired.exists()
    code, _, err = cli(capsys, "train", str(shared), "--resume")  # resuming from the run's own config
    assert code == 2 and "Traceback" not in err and not fired.exists()
    code, _, err = cli(capsys, "eval", str(shared), "--data", str(chat_data[1]), "--trust-remote-code")
    assert fired.exists() and "trust_remote_code is on" in err  # the command's own flag: code runs, said on screen


def test_a_delta_artifacts_json_never_runs_code(llama_dir, chat_data, canary, tmp_path, capsys):
    model, fired = canary
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "b", max_steps=1)
    cfg["method"] = {"name": "bitfit"}
    tunelab.train(cfg, quiet=True)
    meta_path = tmp_path / "b" / "final" / "tunelab_method.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"].update(name_or_path=str(model), trust_remote_code=True)
    meta_path.write_text(json.dumps(meta))
    code, _, err = cli(capsys, "generate", str(tmp_path / "b" / "final"), "--prompt", "hi", "--max-new-tokens", "2")
    assert one_line(code, err, "needs its own Python code") and not fired.exists()


def test_an_adapter_of_pickle_weights_is_refused(run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final", adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    code, _, err = cli(capsys, "generate", str(adapter), "--prompt", "hi", "--max-new-tokens", "2")
    assert one_line(code, err, "adapter_model.bin", "pickle", "--allow-pickle")


# ----------------------------------------------------------------------------- checkpoints and disk


def test_a_linked_checkpoint_is_never_loaded_nor_replaced(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "r"
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=4, save_every=2)
    assert tunelab.train(cfg, quiet=True).status == "completed"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out / "checkpoints" / "step-4", elsewhere)
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "checkpoints" / "step-4").symlink_to(elsewhere)
    assert checkpoint.latest(out / "checkpoints").name == "step-2"
    code, _, err = cli(capsys, "train", str(out), "--resume", "-q")
    assert one_line(code, err, "step-4 is a link") and (elsewhere / checkpoint.MANIFEST).is_file()


def test_disk_full_is_one_line_naming_the_last_good_checkpoint_and_resume_finishes(
        llama_dir, chat_data, tmp_path, monkeypatch):
    from tunelab.training import state

    out = tmp_path / "r"
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=4, save_every=2)
    real, calls = state.save_file, []

    def full_at_second_save(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(state, "save_file", full_at_second_save)
    with pytest.raises(TunelabError) as e:
        tunelab.train(cfg, quiet=True)
    assert "disk full at" in e.value.message and "the last good checkpoint is step-2" in e.value.message
    assert "--resume" in e.value.fix
    assert list((out / "checkpoints").glob(".tmp-step-*"))  # the torn write, never loaded ...
    monkeypatch.setattr(state, "save_file", real)
    assert tunelab.train(out, resume=True, quiet=True).status == "completed"
    assert not list((out / "checkpoints").glob(".tmp-step-*"))  # ... and cleared at the next start


# ----------------------------------------------------------------------------- configs and data


@pytest.mark.parametrize("key, value, needle", [
    ("train.lr", float("nan"), "train.lr"), ("train.lr", float("inf"), "train.lr"), ("train.lr", 1e39, "train.lr"),
    ("train.weight_decay", float("inf"), "train.weight_decay"), ("train.max_grad_norm", float("nan"),
                                                                 "train.max_grad_norm"),
    ("train.epochs", float("inf"), "train.epochs"), ("train.adam_betas", [0.9, 1.0], "train.adam_betas"),
    ("train.seed", 2**200, "train.seed"), ("train.seed", -1, "train.seed"), ("method.alpha", float("nan"),
                                                                            "method.alpha"),
    ("train.max_steps", 10**30, "train.max_steps"), ("train.grad_accum", 10**12, "train.grad_accum"),
])
def test_non_finite_and_out_of_range_numbers_are_refused_naming_the_key(key, value, needle):
    section, field = key.split(".")
    raw = {section: {field: value}} | ({"method": {"name": "lora", field: value}} if section == "method" else {})
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config(raw)


class _Stop(Exception):
    pass


def test_an_absurd_plan_is_warned_before_it_starts(llama_dir, chat_data, tmp_path, monkeypatch):
    from tunelab.recipes.run import train
    from tunelab.training import progress

    said: list[str] = []
    monkeypatch.setattr(progress.Reporter, "say", lambda self, text: said.append(text))

    def stop(event):
        if event.kind == "start":
            raise _Stop

    with pytest.raises(_Stop):  # the warning comes before the first step; no need to run 50,000 micro-batches
        train(run_cfg(llama_dir, chat_data, tmp_path / "w", max_steps=50, grad_accum=1000, batch_size=2),
              on_event=stop)
    assert any(s.startswith("warning: this run makes") and "passes over" in s for s in said), said


@pytest.mark.parametrize("line, reason", [
    ('{"text": ' + "9" * 5000 + "}", "bad JSON: Exceeds the limit"),
    ("[" * 100_000 + "]" * 100_000, "bad JSON: nested too deeply"),
    ('{"text": "a \\ud800 b"}', "a lone surrogate (\\ud800) is not text"),
])
def test_records_that_break_parsers_are_per_record_reasons(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good"}\n' + line + '\n{"text": "good"}\n')
    got = list(read_records(str(path)))
    assert [w for w, _ in got] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert isinstance(got[1][1], Exception) and reason in got[1][1].reason


def test_a_long_csv_field_is_a_record_like_any_other(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nshort\n" + "x" * 300_000 + "\nshort\n")
    got = [r for _, r in read_records(str(path))]
    assert [len(r["text"]) for r in got] == [5, 300_000, 5]
