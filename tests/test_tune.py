"""`tunelab tune`: the space is checked before any trial, a study writes a best.yaml that trains, failed
trials are reported while the rest go on, the pruner stops a bad trial, two workers share one SQLite
study without going past its trial count, and a study killed mid-trial resumes without rerunning
what finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from tests.test_cli import cli
from tests.test_train_loop import run_cfg
from tunelab.errors import ConfigError, TunelabError
from tunelab.recipes.run import resolve_config
from tunelab.recipes.tune import parse_metric, tune
from tunelab.recipes.tune_space import load_space
from tunelab.runconfig import load_config
from tunelab.training.loop import Loop

LR = {"train.lr": {"type": "float", "low": 1e-4, "high": 5e-2, "log": True}}


@pytest.fixture
def base(llama_dir, chat_data, tmp_path) -> dict:
    return run_cfg(llama_dir, chat_data, tmp_path / "unused", max_steps=4, eval_every=2)


def write(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def test_a_bad_space_fails_before_any_trial_with_one_line_per_problem(base, tmp_path, capsys):
    bad = {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2},          # unknown config key
           "method.r": {"type": "int", "low": 16, "high": 4},                   # bounds reversed
           "train.warmup": {"type": "float", "low": 0.0, "high": 0.5, "log": True},  # log from 0
           "method.alpha": {"type": "int", "lo": 4, "high": 8},                 # unknown setting
           "train.max_steps": {"choices": []},
           "method.dropout": {"type": "float", "low": 0.0, "high": 2.0}}        # outside the config's range
    with pytest.raises(ConfigError) as e:
        load_space(bad, resolve_config(base).to_dict())
    lines = e.value.message.splitlines()
    assert len(lines) == 6, lines
    assert any("train.lrr: unknown key (did you mean 'lr'?)" in x for x in lines)
    assert any("method.r: low (16) must be below high (4)" in x for x in lines)
    assert any("train.warmup: a log range needs low > 0" in x for x in lines)
    assert any("method.alpha: unknown setting 'lo' (did you mean 'low'?)" in x for x in lines)
    assert any("train.max_steps: choices must be a non-empty list" in x for x in lines)
    assert any("method.dropout" in x and "(as method.dropout=2.0)" in x for x in lines)

    good = load_space({"train.lr": {"type": "float", "low": "1e-5", "high": 1e-2, "log": True},  # YAML's 1e-5: a str
                       "method.target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]}},
                      resolve_config(base).to_dict())
    assert good["train.lr"].low == 1e-5 and good["method.target_modules"].labels == ("[q_proj, v_proj]", "all-linear")
    assert good["method.target_modules"].value("[q_proj, v_proj]") == ["q_proj", "v_proj"]

    cfg = write(tmp_path / "cfg.yaml", base)
    code, _, err = cli(capsys, "tune", str(cfg), "--space", str(write(tmp_path / "empty.yaml", {})), "--trials", "2",
                       "--out", str(tmp_path / "t"))
    assert code == 2 and "the search space is empty" in err and "Traceback" not in err, err
    code, _, err = cli(capsys, "tune", str(cfg), "--space", str(write(tmp_path / "s.yaml", {"trian.lr": [1e-3]})),
                       "--trials", "2", "--out", str(tmp_path / "t"))
    assert code == 2 and "trian: unknown key (did you mean 'train'?)" in err and "Traceback" not in err, err
    assert not (tmp_path / "t").exists()  # nothing ran, nothing written


def test_the_metric_is_chosen_on_validation_never_test():
    assert parse_metric("eval_loss").direction == "minimize"
    m = parse_metric("tinyworld:qa@validation:exact_match")
    assert (m.task, m.name, m.direction) == ("tinyworld:qa@validation", "exact_match", "maximize")
    for spec in ("tinyworld:qa@test:exact_match", "tinyworld:qa:exact_match"):
        with pytest.raises(TunelabError, match="never on test"):
            parse_metric(spec)


def test_a_study_writes_a_best_yaml_that_loads_trials_csv_and_a_report(base, tmp_path):
    space = {**LR, "method.r": [2, 4], "method.target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]}}
    base["method"]["target_modules"] = "all-linear"
    r = tune(base, space, trials=3, out=tmp_path / "t", seed=0, quiet=True)
    assert r.status == "completed" and r.counts == {"complete": 3}, r
    out = tmp_path / "t"
    best = load_config(out / "best.yaml")  # a valid config
    assert best.train.lr == pytest.approx(r.best_params["train.lr"]) and best.method.r == r.best_params["method.r"]
    assert best.output.dir == str(out / "best")
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("number,state,value")
    first = rows[1].split(",")
    assert first[1] == "complete" and first[4] == "1"  # trial 0 is the config's own values (the baseline)
    st = study(f"sqlite:///{out / 'study.db'}", r.study)
    assert st.trials[0].params == {"train.lr": 1e-2, "method.r": 4, "method.target_modules": "all-linear"}
    report = (out / "report.md").read_text()
    assert "## Best" in report and "the config's own values (trial 0)" in report
    assert (out / "history.png").stat().st_size > 0
    assert not (out / "trials" / "trial-0000" / "checkpoints").exists()  # trials keep their model, not checkpoints
    assert (out / "trials" / "trial-0000" / "final").is_dir()
    again = tune(base, space, trials=3, out=out, seed=0, quiet=True)  # resumed: the study is full, nothing runs
    assert again.counts == r.counts and len(rows) == len((out / "trials.csv").read_text().splitlines())
    with pytest.raises(TunelabError, match="made with another search space"):
        tune(base, LR, trials=4, out=out, quiet=True)


def test_a_grid_runs_each_choice_once_and_marks_the_configs_own(base, tmp_path, capsys):
    """--sampler grid: a 1-D learning-rate sweep runs every value once (trials capped at the grid), the
    trial with the config's own lr (1e-2) is the baseline; a range cannot be a grid."""
    grid = {"train.lr": [1e-3, 1e-2, 3e-2]}
    r = tune(base, grid, trials=10, out=tmp_path / "g", seed=0, quiet=True, sampler="grid", pruner="none")
    st = study(r.storage, r.study)
    assert sorted(t.params["train.lr"] for t in st.trials) == [1e-3, 1e-2, 3e-2] and r.counts == {"complete": 3}
    assert [t.params["train.lr"] for t in st.trials if t.user_attrs.get("baseline")] == [1e-2]
    assert "(config's own)" in (tmp_path / "g" / "report.md").read_text()
    with pytest.raises(TunelabError, match="train.lr is a range, not a list of choices"):
        tune(base, LR, trials=2, out=tmp_path / "r", quiet=True, sampler="grid")
    code, _, err = cli(capsys, "tune", str(write(tmp_path / "cfg.yaml", base)), "--space",
                       str(write(tmp_path / "s.yaml", grid)), "--trials", "2", "--sampler", "gird",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "--sampler gird: unknown" in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_failing_trials_get_one_line_each_and_the_study_goes_on(base, tmp_path, monkeypatch, capsys):
    real_step = Loop.train_step

    def step(self):
        if self.cfg.train.lr == 2e-2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Loop, "train_step", step)
    base["train"]["max_grad_norm"] = None  # lr 100 unclipped: the gradient turns NaN
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    st = optuna.create_study(storage=storage, study_name="s")
    for lr in (1e-2, 2e-2, 100.0, 5e-3):
        st.enqueue_trial({"train.lr": lr})
    r = tune(base, {"train.lr": {"choices": [1e-2, 2e-2, 100.0, 5e-3]}}, trials=4, out=tmp_path / "t",
             storage=storage, study="s", pruner="none")
    assert r.counts == {"complete": 2, "fail": 2} and r.status == "completed"
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("trial ")]
    assert len(lines) == 4 and "failed: out of memory at step 1" in lines[1], lines
    assert "failed: non-finite loss" in lines[2] and "eval_loss" in lines[3]
    report = (tmp_path / "t" / "report.md").read_text()
    failed = report.split("## Failed trials")[1].strip().splitlines()
    assert failed[0].startswith("- trial 1: out of memory at step 1") and failed[1].startswith("- trial 2: non-finite")


def test_the_pruner_stops_a_clearly_bad_trial_early(base, tmp_path):
    base["train"].update(max_steps=6, eval_every=1)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    st = optuna.create_study(storage=storage, study_name="s")
    st.enqueue_trial({"train.lr": 3e-2})  # learns
    st.enqueue_trial({"train.lr": 1e-6})  # does not: above the median of the trials before it from its first eval
    space = {"train.lr": {"type": "float", "low": 1e-7, "high": 5e-2, "log": True}}
    r = tune(base, space, trials=2, out=tmp_path / "t", storage=storage, study="s", quiet=True,
             pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    assert r.counts == {"complete": 1, "pruned": 1}, r
    bad = study(storage, "s").trials[1]
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.user_attrs["pruned_at"].startswith("step 1 of 6")
    assert list(bad.intermediate_values) == [1]  # it stopped at its first eval, with nothing saved
    assert not (tmp_path / "t" / "trials" / "trial-0001" / "final").exists()


def tunelab(*args: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if fault:
        env["TUNELAB_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "tunelab", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_workers_share_one_sqlite_study_and_stop_at_its_trial_count(base, tmp_path):
    cfg = write(tmp_path / "cfg.yaml", base)
    space = write(tmp_path / "space.yaml", {**LR, "method.r": [2, 4, 8]})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [tunelab("tune", str(cfg), "--space", str(space), "--trials", "4", "--storage", storage, "--study",
                       "shared", "--out", str(tmp_path / name)) for name in ("a", "b")]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    trials = study(storage, "shared").trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # one number each
    ran = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(ran) == 4 and all(t.state.is_finished() for t in ran)
    dirs = {name: {p.name for p in (tmp_path / name / "trials").iterdir()} for name in ("a", "b")}
    assert dirs["a"] and dirs["b"] and not dirs["a"] & dirs["b"], dirs  # both worked, never on the same trial
    assert len(dirs["a"] | dirs["b"]) == 4


@pytest.mark.slow
def test_a_study_killed_mid_trial_resumes_without_rerunning_finished_trials(base, tmp_path):
    cfg = write(tmp_path / "cfg.yaml", base)
    space = write(tmp_path / "space.yaml", LR)
    out = tmp_path / "t"
    args = ("tune", str(cfg), "--space", str(space), "--trials", "4", "--out", str(out), "--study", "k")
    w = tunelab(*args, fault="kill@trial:2")  # SIGKILL in trial 2's first step
    w.communicate(timeout=300)
    assert w.returncode == -signal.SIGKILL
    storage = f"sqlite:///{out / 'study.db'}"
    before = study(storage, "k").trials
    assert [t.state.name for t in before] == ["COMPLETE", "COMPLETE", "RUNNING"]
    logs = {n: (out / "trials" / f"trial-{n:04d}" / "metrics.jsonl").read_text() for n in (0, 1)}
    time.sleep(3.5)  # past the resumed worker's grace period (3 x heartbeat_s): trial 2's worker is dead

    r = tune(str(cfg), str(space), trials=4, out=out, study="k", heartbeat_s=1, quiet=True)
    after = study(storage, "k").trials
    assert [t.state.name for t in after] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert [t.value for t in after[:2]] == [t.value for t in before[:2]]
    assert all((out / "trials" / f"trial-{n:04d}" / "metrics.jsonl").read_text() == logs[n] for n in (0, 1))
    assert r.counts == {"complete": 4, "fail": 1} and r.status == "completed"
    assert "- trial 2: its worker stopped before it finished (killed?)" in (out / "report.md").read_text()
