"""`tunelab compare`: cells in their own processes, a database that survives a kill, statistics that
say when a difference is noise, one clear line for every cell that could not run."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import tiny
from tunelab.errors import ConfigError, TunelabError
from tunelab.recipes.compare import _only, cell_env, compare
from tunelab.recipes.compare.spec import load_spec, nest
from tunelab.recipes.compare.stats import paired, pareto, sign_test, summarize


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmp")
    records = [{"messages": [{"role": "user", "content": f"what colour is the {t}?"},
                             {"role": "assistant", "content": c}], "answer": c}
               for t, c in zip(tiny.THINGS, tiny.COLOURS, strict=True)]
    train = tiny.write_jsonl(d / "train.jsonl", records * 4)
    test = tiny.write_jsonl(d / "test.jsonl", records)
    return train, test


def write_spec(path, llama_dir, train, test, variants, seeds=(0, 1)):
    spec = {
        "base": None,
        "budget": {"train.max_steps": 2, "train.batch_size": 4, "train.precision": "fp32"},
        "seeds": list(seeds),
        "tasks": [{"name": "colours", "eval": str(test), "metric": "exact_match",
                   "overrides": {"model.name_or_path": str(llama_dir), "data.train": str(train),
                                 "data.chat_template": "chatml"}}],
        "variants": variants,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


VARIANTS = [
    {"name": "zero-shot", "train": False},
    {"name": "lora", "overrides": {"method.name": "lora", "method.r": 2, "train.lr": 1e-3}},
    {"name": "typo", "overrides": {"method.name": "lora", "method.rr": 2}},
    {"name": "missing-data", "overrides": {"data.train": "/nonexistent/train.jsonl"}},
]


def test_compare_runs_cells_reports_and_names_each_problem(tmp_path, llama_dir, task_files):
    train, test = task_files
    spec = write_spec(tmp_path / "spec.yaml", llama_dir, train, test, VARIANTS)
    lines: list[str] = []
    agg = compare(spec, out=tmp_path / "out", workers=2, say=lines.append)
    rows = agg["colours"]["variants"]
    assert rows["zero-shot"]["done"] == 1 and rows["lora"]["done"] == 2  # zero-shot: one cell, it is deterministic
    assert rows["lora"]["trainable"] > 0 and rows["zero-shot"]["trainable"] == 0
    assert rows["typo"]["done"] == 0 and "method.rr" in rows["typo"]["problems"][0]
    assert "did you mean" in rows["typo"]["problems"][0]
    assert rows["missing-data"]["done"] == 0 and "/nonexistent/train.jsonl" in rows["missing-data"]["problems"][0]
    assert "vs_base" in rows["lora"] and agg["colours"]["base"] == "zero-shot"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| lora |" in report and "**typo**: " in report and "**missing-data**: " in report
    cells = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(cells) == 1 + 1 + 2 + 2 + 2
    assert (tmp_path / "out" / "plots" / "colours-cost.png").stat().st_size > 1000
    assert any(line.startswith("[") and "eta" in line for line in lines)
    # A second run finds everything done: nothing reruns, the same report comes back.
    again = compare(spec, out=tmp_path / "out", say=lines.append)
    assert again["colours"]["variants"]["lora"]["scores"] == rows["lora"]["scores"]
    db = sqlite3.connect(tmp_path / "out" / "compare.db")
    assert {a for (a,) in db.execute("select attempts from tunelab_compare_cells where status='done'")} == {1}


def test_bad_specs_are_one_line_errors(tmp_path, llama_dir, task_files):
    train, test = task_files
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tasks": [], "variants": [{"name": "a"}]}))
    with pytest.raises(TunelabError, match="tasks"):
        compare(tmp_path / "s.yaml", out=tmp_path / "o")
    spec = write_spec(tmp_path / "d.yaml", llama_dir, train, test, [{"name": "a"}, {"name": "a"}])
    with pytest.raises(TunelabError, match="repeated: a"):
        load_spec(spec)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    spec = write_spec(tmp_path / "ok.yaml", llama_dir, train, test, [{"name": "z", "train": False}])
    with pytest.raises(TunelabError, match="not made by tunelab|--force"):
        compare(spec, out=foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_nest_and_statistics():
    assert nest({"train.lr": 1e-3, "method.name": "lora"}) == {"train": {"lr": 1e-3}, "method": {"name": "lora"}}
    assert nest(["train.lr=0.001"]) == {"train": {"lr": 0.001}}
    s = summarize([0.5, 0.6, 0.7])
    assert s.mean == pytest.approx(0.6) and s.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert math.isnan(summarize([0.5]).half_width)
    # paired over seeds: a constant +0.1 on every seed separates; noise around zero does not
    assert paired({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.6, 2: 0.7}).p == 0.0
    t = paired({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert t.diff == pytest.approx(0.05 / 3) and not t.separates and "within noise" in t.text(100)
    base = paired({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.5})  # a one-cell base is a constant
    assert base.separates and base.diff == pytest.approx(0.41)
    flipped = paired({0: 0.5}, {0: 0.9, 1: 0.91, 2: 0.92})  # the base against the best
    assert flipped.diff == pytest.approx(-0.41) and flipped.p == base.p
    assert pareto([(1, 0.5), (2, 0.6), (3, 0.55), (1, 0.4)]) == [0, 1]


@pytest.mark.slow
def test_a_killed_compare_resumes_to_the_same_table_without_rerunning_finished_cells(tmp_path, llama_dir,
                                                                                      task_files):
    train, test = task_files
    variants = [{"name": "zero-shot", "train": False},  # one cell; lora two (seeds 0, 1)
                {"name": "lora", "overrides": {"method.name": "lora", "method.r": 2, "train.lr": 1e-3}}]
    spec = write_spec(tmp_path / "spec.yaml", llama_dir, train, test, variants)
    whole = compare(spec, out=tmp_path / "whole", say=lambda _: None)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tunelab", "compare", str(spec), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = out / "compare.db"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill it once two cells are done and another is running
        if db.is_file():
            rows = sqlite3.connect(db).execute("select status from tunelab_compare_cells").fetchall()
            if sum(s == "done" for (s,) in rows) >= 2 and any(s == "running" for (s,) in rows):
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = dict(sqlite3.connect(db).execute("select cell, attempts from tunelab_compare_cells where status='done'"))
    assert len(before) >= 2
    resumed = compare(spec, out=out, say=lambda _: None)
    after = dict(sqlite3.connect(db).execute("select cell, attempts from tunelab_compare_cells"))
    assert all(after[k] == 1 for k in before)  # finished cells were not run again
    assert any(v == 2 for v in after.values())  # the one killed mid-run was
    for name in ("zero-shot", "lora"):
        assert resumed["colours"]["variants"][name]["scores"] == whole["colours"]["variants"][name]["scores"]
    assert json.loads((out / "results.json").read_text())["counts"] == "3 done"


def test_part_of_a_spec_runs_with_variants_and_tasks_filters(tmp_path, llama_dir, task_files):
    """--variants/--tasks: a variant limited to tasks of which some are filtered out keeps the rest;
    a name the spec lacks is an error naming what it has."""
    train, test = task_files
    spec_file = write_spec(tmp_path / "s.yaml", llama_dir, train, test,
                           [{"name": "z", "train": False}, {"name": "l", "tasks": ["colours"]}])
    spec, _ = load_spec(spec_file)
    spec = spec.model_copy(update={"tasks": [*spec.tasks, spec.tasks[0].model_copy(update={"name": "other"})]})
    part = _only(spec, ["l"], ["other"])
    assert [v.name for v in part.variants] == ["l"] and part.variants[0].tasks == []
    with pytest.raises(ConfigError, match="unknown variant.*nope; the spec has: z, l"):
        _only(spec, ["nope"], None)


def test_untrained_cells_are_one_unless_icl_draws_shots(tmp_path, llama_dir, task_files):
    """Zero-shot and deterministic techniques (ICL by similarity, RAG) are one cell; ICL that draws its
    shots at random runs every seed, each seed drawing other shots."""
    from tunelab.recipes.compare.spec import cells

    train, test = task_files
    spec_file = write_spec(tmp_path / "s.yaml", llama_dir, train, test, [
        {"name": "z", "train": False},
        {"name": "icl-similar", "train": False, "overrides": {"icl.k": 2, "icl.select": "similar"}},
        {"name": "icl-random", "train": False, "overrides": {"icl.k": 2}},
        {"name": "icl-order", "train": False,
         "overrides": {"icl.k": 2, "icl.select": "similar", "icl.order": "random"}},
        {"name": "l"}], seeds=(0, 1, 2))
    spec, _ = load_spec(spec_file)
    got = cells(spec, tmp_path, lambda task: {})
    counts = {v: sum(c.variant == v for c in got) for v in ("z", "icl-similar", "icl-random", "icl-order", "l")}
    assert counts == {"z": 1, "icl-similar": 1, "icl-random": 3, "icl-order": 3, "l": 3}
    assert [c.config["icl"]["seed"] for c in got if c.variant == "icl-random"] == [0, 1, 2]


def test_a_report_names_its_spec_without_machine_paths(tmp_path, monkeypatch):
    from tunelab.config import SHIPPED_CONFIGS
    from tunelab.recipes.compare import _shown

    assert _shown(SHIPPED_CONFIGS / "compare-tinyworld.yaml") == "configs/compare-tinyworld.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    assert _shown(tmp_path / "specs" / "mine.yaml") == "specs/mine.yaml"
    assert _shown(Path("/elsewhere/spec.yaml")) == "/elsewhere/spec.yaml"  # outside: as the user named it


def test_cells_share_the_cores_among_workers_unless_the_user_chose():
    assert cell_env(2, {"PATH": "/bin"}, cores=2) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert cell_env(1, {}, cores=16)["OMP_NUM_THREADS"] == "16"
    assert cell_env(3, {}, cores=16)["OMP_NUM_THREADS"] == "5"
    assert cell_env(8, {}, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert cell_env(2, {"OMP_NUM_THREADS": "4"}, cores=2)["OMP_NUM_THREADS"] == "4"  # the user's choice stays


def test_sign_test_is_the_two_sided_binomial_sum():
    def naive(k: int, n: int) -> float:  # 2 x the smaller tail of Binomial(n, 1/2), at most 1
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)

    for k, n in [(10, 11), (1, 11), (8, 9), (10, 30), (3, 6), (0, 5), (60, 67)]:
        assert sign_test(k, n) == pytest.approx(naive(k, n), rel=1e-9)
    assert sign_test(0, 0) == 1.0  # no question where the two differ: no evidence
