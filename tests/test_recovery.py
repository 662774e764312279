"""Recovery paths that recover: a config rewrite killed midway leaves a resumable run, a bad newest
checkpoint is reported and kept aside, fix texts name commands that work, method settings that
match nothing are one line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml

import tunelab
from tests.test_cli import cli
from tests.test_resume import tunelab as tunelab_process
from tests.test_train_loop import run_cfg
from tunelab.errors import ResumeError
from tunelab.training import checkpoint


def cfg_file(tmp: Path, llama_dir: Path, chat_data: tuple[Path, Path], **train) -> tuple[Path, Path]:
    out = tmp / "run"
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(run_cfg(llama_dir, chat_data, out, **train)))
    return path, out


@pytest.mark.slow
def test_a_kill_while_the_config_is_rewritten_leaves_the_run_resumable(llama_dir, chat_data, tmp_path):
    cfg, out = cfg_file(tmp_path, llama_dir, chat_data, max_steps=4, save_every=2)
    assert tunelab_process("train", str(cfg), "-q", fault="kill@step:3").returncode == -signal.SIGKILL
    before = (out / "config.yaml").read_bytes()
    killed = tunelab_process("train", str(out), "--resume", "-q", fault="kill@write-config.yaml:0")
    assert killed.returncode == -signal.SIGKILL
    assert (out / "config.yaml").read_bytes() == before  # the old config, whole: never truncated
    done = tunelab_process("train", str(out), "--resume", "-q")
    assert done.returncode == 0, done.stderr
    assert (out / "final").is_dir()


def test_a_bad_newest_checkpoint_is_named_kept_aside_and_resume_goes_on(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=4, save_every=2), quiet=True).steps == 4
    newest = out / "checkpoints" / "step-4"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # a flipped tail: the sha256 no longer matches
    assert checkpoint.why_not_verified(newest) == "trainable.safetensors does not match its sha256"
    code, _, err = cli(capsys, "train", str(out), "--resume", "-q", "--allow-changed")
    assert code == 0, err
    assert "step-4 failed verification (trainable.safetensors does not match its sha256): kept aside as " \
           "step-4.rejected" in err
    assert (out / "checkpoints" / "step-4.rejected" / "trainable.safetensors").is_file()  # the evidence stays
    assert checkpoint.verify(out / "checkpoints" / "step-4")  # the resumed run wrote step 4 again


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / checkpoint.MANIFEST).unlink(), "no manifest.json"),
    (lambda d: (d / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    (lambda d: (d / checkpoint.MANIFEST).write_text("{"), "manifest.json unreadable"),
])
def test_each_verification_failure_says_why(llama_dir, chat_data, tmp_path, damage, why):
    out = tmp_path / "run"
    tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=2, save_every=2), quiet=True)
    ckpt = out / "checkpoints" / "step-2"
    damage(ckpt)
    assert why in checkpoint.why_not_verified(ckpt)
    found, notes = checkpoint.resume_point(out / "checkpoints")
    assert found is None and len(notes) == 1 and why in notes[0]


def test_resume_without_a_checkpoint_names_a_command_that_works(llama_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "run"
    tunelab.train(run_cfg(llama_dir, chat_data, out, max_steps=2), quiet=True)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ResumeError) as e:
        tunelab.train(out, resume=True, quiet=True)
    assert "--overwrite" in e.value.fix
    code, _, err = cli(capsys, "train", str(out), "--overwrite", "-q")  # ... and that command works
    assert code == 0, err


def test_target_modules_that_match_nothing_are_one_line(llama_dir, chat_data, tmp_path, capsys):
    cfg, _ = cfg_file(tmp_path, llama_dir, chat_data, max_steps=1)
    code, _, err = cli(capsys, "train", str(cfg), "method.target_modules=[no_such_proj]", "-q")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) <= 2
    assert "method lora" in lines[0] and "target_modules" in lines[1]


@pytest.mark.slow
def test_sigterm_during_start_up_checkpoints_and_exits_resumable(llama_dir, chat_data, tmp_path):
    cfg, out = cfg_file(tmp_path, llama_dir, chat_data, max_steps=3)
    stopped = tunelab_process("train", str(cfg), fault="term@start:0")
    assert stopped.returncode == 75, stopped.stderr  # EXIT_RESUMABLE, not killed (-15 / 143)
    assert "before the first step" in stopped.stderr and checkpoint.latest(out / "checkpoints") is not None
    done = tunelab_process("train", str(out), "--resume", "-q")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sigterm_while_the_final_model_is_written_still_completes(llama_dir, chat_data, tmp_path):
    cfg, out = cfg_file(tmp_path, llama_dir, chat_data, max_steps=2)
    done = tunelab_process("train", str(cfg), "-q", fault="term@final:0")
    assert done.returncode == 0, done.stderr  # every step was applied: a finished run reads as finished
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "summary.json").is_file()


def test_a_diverged_update_halts_before_it_is_checkpointed_and_resume_from_goes_back(
        llama_dir, chat_data, tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / "run"
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=6, save_every=2)
    real_step, calls = torch.optim.AdamW.step, []

    def diverging(self, *a, **k):  # a finite loss and gradient, then weights that blow up at step 5
        calls.append(1)
        result = real_step(self, *a, **k)
        if len(calls) == 5:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging)
    with pytest.raises(tunelab.errors.NonFiniteError) as e:
        tunelab.train(cfg, quiet=True)
    assert "the update of step 5 made trainable weights non-finite" in e.value.message
    assert f"tunelab train {out} --resume train.lr=<lower> --allow-changed" in e.value.fix
    assert checkpoint.latest(out / "checkpoints").name == "step-4"  # step 5 was never saved
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    code, _, err = cli(capsys, "train", str(out), "--resume-from", "step-2", "train.lr=1e-3", "--allow-changed", "-q")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) == 2  # steps 3-4 ran again from step-2
    code, _, err = cli(capsys, "train", str(out), "--resume-from", "step-9", "-q")
    assert code == 2 and "no such checkpoint" in err and "step-" in err


def test_a_chat_template_that_loops_for_ever_stops_the_data_check(llama_dir, chat_data, tmp_path, capsys):
    slow = tmp_path / "slow.jinja"
    slow.write_text("{% for m in messages %}{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                    "{% endfor %}{{ m['content'] }}{% endfor %}")
    cfg, _ = cfg_file(tmp_path, llama_dir, chat_data, max_steps=1)
    code, _, err = cli(capsys, "data", "check", str(cfg), f"data.chat_template={slow}")
    assert code == 2 and "took more than 2 s to render one chat" in err and "Traceback" not in err


def test_a_second_signal_stops_at_once():
    import os

    from tunelab.training.guards import StopSignal

    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # the first asks the loop to finish its step
        with pytest.raises(KeyboardInterrupt):  # a step that never ends cannot hold the second
            os.kill(os.getpid(), signal.SIGTERM)


def test_output_dir_that_is_a_file_is_one_line(llama_dir, chat_data, tmp_path, capsys):
    cfg, _ = cfg_file(tmp_path, llama_dir, chat_data, max_steps=1)
    (tmp_path / "afile").write_text("x")
    code, _, err = cli(capsys, "train", str(cfg), f"output.dir={tmp_path / 'afile'}", "-q")
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "x"
