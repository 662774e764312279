"""The CLI: user errors are one or two lines and exit 2, never a traceback; commands work end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import ModelConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize(
    "body, expect",
    [
        ({"train": {"lrr": 1}}, "train.lrr: unknown key (did you mean 'lr'?); allowed: max_steps"),
        ({"train": {"batch_size": "big"}}, "train.batch_size: Input should be a valid integer"),
        ({"data": {"overlength": "squash"}}, "data.overlength: Input should be 'truncate', 'drop' or 'raise'"),
        ({"method": {"name": "lorra"}}, "method.name: unknown method 'lorra' (did you mean 'lora'?); registered: "
                                        "adalora, adapters,"),
        ({"method": {"name": "lora", "rank": 4}}, "method.rank: unknown key; allowed: name, r, alpha"),
        ({"train": {"keep_last": 1}}, "train.keep_last: Input should be greater than or equal to 2"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, capsys, body, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    code, _, err = cli(capsys, "train", str(path))
    assert code == 2
    assert f"{path}: {expect}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_bad_override_and_missing_file(tmp_path, capsys):
    code, _, err = cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such config file" in err
    path = tmp_path / "ok.yaml"
    path.write_text("train: {max_steps: 1}\n")
    code, _, err = cli(capsys, "train", str(path), "train.max_steps=abc")
    assert code == 2 and "train.max_steps: Input should be a valid integer" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1,\n")
    code, _, err = cli(capsys, "train", str(path))
    assert code == 2 and f"{path}:" in err and "not valid YAML" in err


def test_methods_lists_registry(capsys):
    code, out, _ = cli(capsys, "methods")
    assert code == 0
    assert re.search(r"^lora\s+reparameterized\s+peft\s+mergeable", out, re.M)
    assert re.search(r"^full\s+full\s+ours", out, re.M)
    code, out, _ = cli(capsys, "methods", "--json")
    assert {r["name"] for r in json.loads(out)} >= {"full", "lora"}


def test_python_dash_m_runs_the_same_cli():
    r = subprocess.run([sys.executable, "-m", "tunelab", "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "lora" in r.stdout


def test_end_to_end_train_eval_generate_export(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "a"
    code, _, err = cli(capsys, "train", "-q", str(_cfg(tmp_path, llama_dir, chat_data)), "train.max_steps=3",
                       f"output.dir={out}")
    assert code == 0, err
    code, stdout, _ = cli(capsys, "eval", str(out), "--data", str(chat_data[1]), "--json")
    m = json.loads(stdout)
    assert code == 0 and m["loss"] > 0 and m["perplexity"] > 1 and m["tokens"] > 0
    code, stdout, _ = cli(capsys, "generate", str(out), "--prompt", "what colour is the lamp?", "--max-new-tokens", "5")
    assert code == 0 and isinstance(stdout, str)
    code, stdout, _ = cli(capsys, "generate", str(llama_dir), "--prompt", "hi", "--max-new-tokens", "3")
    assert code == 0
    code, stdout, _ = cli(capsys, "export", str(out), "--merge", "--out", str(tmp_path / "m"))
    assert code == 0 and (tmp_path / "m" / "model.safetensors").exists()
    code, stdout, _ = cli(capsys, "data", "check", str(_cfg(tmp_path, llama_dir, chat_data)))
    assert code == 0 and "trained" in stdout.lower()


def _cfg(tmp: Path, model_dir: Path, data: tuple[Path, Path]) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data[0]), "eval": str(data[1]), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "train": {"batch_size": 4, "tensorboard": False},
    }))
    return path


def test_pickle_weights_refused_without_trust_flag(llama_dir, tmp_path, capsys):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((llama_dir / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really")
    code, _, err = cli(capsys, "generate", str(d), "--prompt", "hi")
    assert code == 2 and "pickle" in err and "allow_pickle" in err


def test_no_pickle_anywhere_in_src():
    pattern = re.compile(
        r"torch\.load\(|^\s*(import|from)\s+(c?pickle|joblib|dill)\b|pickle\.loads?\(|weights_only\s*=\s*False"
    )
    hits = [f"{p}:{i}" for p in SRC.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def test_trust_remote_code_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert ModelConfig().allow_pickle is False


def test_data_check_resolves_tinyworld_sources_of_a_shipped_config(capsys):
    code, out, err = cli(capsys, "data", "check", "sft-lora", "--json")
    report = json.loads(out)
    assert code == 0, err
    assert report["train"]["tokens"]["examples"] > 0 and report["train"]["source"].endswith(".jsonl")


def test_data_check_exits_2_when_a_run_would_stop(llama_dir, chat_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_data[0].read_text() + '{"messages": 5}\nnot json\n')
    cfg = _cfg(tmp_path, llama_dir, (bad, chat_data[1]))
    code, out, _ = cli(capsys, "data", "check", str(cfg))
    assert code == 2 and "a run would STOP here" in out and "bad JSON" in out
    code, out, _ = cli(capsys, "data", "check", str(cfg), "data.on_error=skip", "data.max_bad_fraction=0.5")
    assert code == 0 and "a run would proceed" in out


def test_the_loss_mask_view_decodes_spans_so_non_ascii_text_survives(tmp_path):
    from tunelab.config import DataConfig
    from tunelab.data.report import check_report, format_check_report
    from tunelab.modeling.load import load_tokenizer

    path = tmp_path / "z.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Where is Zürich?"},
                                             {"role": "assistant", "content": "Zürich, naïve café"}]}) + "\n")
    report = check_report(DataConfig(train=str(path)), load_tokenizer(ModelConfig()), mask_prompt=True)
    trained = [text for text, on in report["train"]["example"]["spans"] if on]
    assert len(trained) == 1 and "Zürich, naïve café" in trained[0]
    assert "\ufffd" not in format_check_report(report) and "Zürich, naïve café" in format_check_report(report)


def test_a_missing_config_fails_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom tunelab.cli import main\ntry:\n    main(['train', 'nonexist.yaml', 'train.lr=1'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert "no such config file" in done.stderr


@pytest.mark.parametrize("override, hint", [("method.name=lroa", "did you mean 'lora'?"),
                                            ("objective.name=dop", "did you mean 'dpo'?"),
                                            ("train.max_step=3", "did you mean 'max_steps'?"),
                                            ("trian.lr=1", "did you mean 'train'?")])
def test_a_misspelt_key_or_name_fails_before_torch_is_imported(tmp_path, override, hint):
    code = (f"import sys\nfrom tunelab.cli import main\ntry:\n    main(['train', 'sft-lora', {override!r}])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert hint in done.stderr and "Traceback" not in done.stderr


def test_the_names_known_before_import_are_the_registries():
    from tunelab.config import METHOD_NAMES, OBJECTIVE_NAMES
    from tunelab.methods import METHODS
    from tunelab.objectives import OBJECTIVES

    assert sorted(METHOD_NAMES) == sorted(METHODS) and sorted(OBJECTIVE_NAMES) == sorted(OBJECTIVES)


@pytest.mark.parametrize("override, hint", [("method.name=lroa", "did you mean 'lora'?"),
                                            ("train.max_step=3", "did you mean 'max_steps'?"),
                                            ("data.packng=true", "did you mean 'packing'?")])
def test_near_misses_get_a_suggestion(capsys, override, hint):
    code, _, err = cli(capsys, "data", "check", "sft-lora", override)
    assert code == 2 and hint in err


def test_a_hub_id_with_no_network_fails_at_once_and_says_why(capsys, monkeypatch):
    from tunelab.modeling import load

    monkeypatch.setattr(load, "_hub_reachable", lambda: False)  # never touch the network in tests
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, _, err = cli(capsys, "generate", "some-org/not-downloaded-model", "--prompt", "hi")
    assert code == 2 and "cannot be reached from here (no network)" in err and "tunelab-tiny" in err
    code, _, err = cli(capsys, "generate", "./no/such/model", "--prompt", "hi")
    assert code == 2 and "no such model folder" in err


@pytest.mark.parametrize("args, expect", [
    (["eval"], "Missing argument 'model'"),
    (["export", "runs/x", "y", "--merge"], "Missing option '--out'"),
    (["train", "a.yaml", "--no-such-flag"], "No such option: --no-such-flag"),
])
def test_usage_errors_are_a_short_message_and_exit_2_never_a_traceback(capsys, args, expect):
    """typer >= 0.29 raises its own copy of click's exceptions (typer._click); they are still usage
    errors, not crashes."""
    code, _, err = cli(capsys, *args)
    assert code == 2 and expect in err and "Traceback" not in err
