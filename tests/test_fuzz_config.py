"""Config fuzzing: every mutated config is a user error that ends as one clear error, fast.

Each case starts from a valid small config (the tiny Llama, a small chat dataset, one training
step) and breaks one thing: an unknown or misspelt key, a wrong type, NaN or infinity, a huge or
negative number, a bad enum value, Adam betas outside [0, 1), a YAML alias bomb, an empty,
binary or non-mapping file, a Python YAML tag, an override. The cases are generated with a fixed
seed, so a failing id reproduces. Every case must exit 2 with at most two non-empty lines on
stderr (`error: ...` and an optional `  fix: ...`), no traceback, within seconds.

The cases run through `tunelab data check` (it validates the config and the data, trains nothing);
a few run through `tunelab train`, still bounded because the base config trains for one step. The
ones that could hang or eat memory (alias bombs, deep nesting, huge literals, huge files) run in a
forked child with a time and memory limit, so a hang fails its case instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import DataConfig, ModelConfig, OutputConfig, TrainConfig
from tunelab.methods.lora import LoraConfig

SEED = 20240611
TIME_LIMIT_S = 30.0  # per case, in process: a hang detector (an alias bomb ran > 120 s), not a speed test
CHILD_TIMEOUT_S = 30.0  # per bounded case, in a forked child; generous so a loaded CI machine never flakes
CHILD_EXTRA_MEMORY = 2 << 30  # address space a bounded case may add before it counts as a memory bomb
MARK = "@@FUZZ@@"  # stands for a YAML snippet spliced into the dumped base config


@dataclass(frozen=True)
class Case:
    id: str
    key: str = ""  # dotted key set (or deleted) in the base config; named in the error
    value: Any = None
    yaml_value: str | None = None  # a YAML snippet as the key's value (aliases, tags, odd literals)
    delete: bool = False
    raw: bytes | None = None  # the whole file, instead of a mutated base config
    overrides: tuple[str, ...] = ()
    names_key: bool = True  # the error must name `key`


# ----------------------------------------------------------------------------- the fields

SECTIONS = {"model": ModelConfig, "data": DataConfig, "method": LoraConfig, "train": TrainConfig,
            "output": OutputConfig}
KINDS = {
    "model.name_or_path": "str", "model.dtype": "enum", "model.trust_remote_code": "bool",
    "model.allow_pickle": "bool", "model.revision": "str", "model.attn_implementation": "enum",
    "model.keep_layers": "intlist",
    "data.train": "str", "data.eval": "str", "data.format": "str", "data.max_length": "int",
    "data.packing": "bool", "data.on_error": "enum", "data.max_bad_fraction": "float", "data.overlength": "enum",
    "data.chat_template": "str",
    "method.r": "int", "method.alpha": "float", "method.dropout": "float", "method.target_modules": "strlist",
    "method.bias": "enum", "method.use_rslora": "bool", "method.modules_to_save": "strlist",
    "train.max_steps": "int", "train.epochs": "float", "train.batch_size": "int", "train.grad_accum": "int",
    "train.lr": "float", "train.scheduler": "enum", "train.warmup": "float", "train.min_lr_ratio": "float",
    "train.weight_decay": "float", "train.adam_betas": "pair", "train.adam_eps": "float",
    "train.max_grad_norm": "float", "train.seed": "int", "train.precision": "enum",
    "train.gradient_checkpointing": "bool", "train.eval_every": "int", "train.select_best": "bool",
    "train.save_every": "int", "train.keep_last": "int", "train.nonfinite": "enum",
    "train.max_consecutive_skips": "int", "train.log_every": "int", "train.tensorboard": "bool",
    "output.dir": "str",
}  # fmt: skip
WRONG_TYPES: dict[str, list[Any]] = {
    "str": [5, 1.5, True, ["a", "b"], {"k": "v"}],
    "enum": [5, ["x"], {"k": 1}, True],
    "bool": ["maybe", 2, [True], {"on": True}],
    "int": ["many", 2.5, [1], {"n": 1}, "1e3"],
    "float": ["fast", [0.1], {"v": 1}, "one"],
    "intlist": ["0,1", [0.5], ["a"], {"k": 1}],
    "strlist": [5, {"q": 1}, [1, 2]],
    "pair": ["0.9 0.999", [0.9], [0.9, 0.99, 0.999], {"b1": 0.9}],
}
NONFINITE_FIELDS = ["train.lr", "train.weight_decay", "train.max_grad_norm", "train.warmup", "train.epochs",
                    "train.min_lr_ratio", "train.adam_eps", "data.max_bad_fraction", "method.alpha", "method.dropout"]
HUGE_FIELDS = ["train.seed", "train.max_steps", "train.batch_size", "train.grad_accum", "data.max_length",
               "method.r"]
OUT_OF_RANGE = {
    "train.max_steps": [-1, 0], "train.epochs": [-1.0, 0.0], "train.batch_size": [-4, 0], "train.grad_accum": [-1, 0],
    "train.lr": [-1e-4, 0.0], "train.warmup": [-1, -0.5, 1.5], "train.min_lr_ratio": [-0.1, 1.5],
    "train.weight_decay": [-0.01], "train.adam_eps": [-1e-8, 0.0], "train.max_grad_norm": [-1.0],
    "train.eval_every": [-1], "train.save_every": [-1], "train.keep_last": [-2, 1],
    "train.max_consecutive_skips": [-1, 0], "train.log_every": [-1, 0], "data.max_length": [-64, 0, 1],
    "data.max_bad_fraction": [-0.1, 1.5], "method.r": [-4, 0], "method.alpha": [-16.0, 0.0],
    "method.dropout": [-0.1, 1.0],
}  # fmt: skip
BAD_ENUMS = {
    "model.dtype": ["float64", "int8"], "model.attn_implementation": ["flash"], "data.on_error": ["ignore"],
    "data.overlength": ["squash"], "data.format": ["tsv"], "train.scheduler": ["step", "Cosine"],
    "train.precision": ["fp8"], "train.nonfinite": ["ignore"], "method.bias": ["some"],
    "method.name": ["lorra", "LoRA"], "objective.name": ["dpo2"], "method.target_modules": ["everything"],
    "data.chat_template": ["no-such-template"],
}
BAD_BETAS = [[1.0, 0.999], [0.9, 1.0], [-0.1, 0.999], [0.9, -0.5], [1.5, 0.999], [0.9, 2]]


def _typo(rng: random.Random, key: str, real: set[str]) -> str:
    for _ in range(100):
        i = rng.randrange(len(key))
        op = rng.choice(["drop", "swap", "double", "replace"])
        if op == "drop" and len(key) > 1:
            t = key[:i] + key[i + 1:]
        elif op == "swap" and i < len(key) - 1:
            t = key[:i] + key[i + 1] + key[i] + key[i + 2:]
        elif op == "double":
            t = key[:i] + key[i] + key[i:]
        else:
            t = key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + key[i + 1:]
        if t != key and t not in real and t.replace("_", "").isalpha():
            return t
    raise AssertionError(f"no typo found for {key}")


def _unknown_and_typo_cases(rng: random.Random) -> list[Case]:
    cases = []
    for section, model in SECTIONS.items():
        real = set(model.model_fields)
        for name in sorted(real):
            typo = _typo(rng, name, real)
            cases.append(Case(f"typo-{section}.{name}-as-{typo}", f"{section}.{typo}", 1))
        for _ in range(2):
            name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
            if name in real:
                continue
            cases.append(Case(f"unknown-{section}.{name}", f"{section}.{name}", rng.choice([1, "x", True, None])))
    for name in ("trainer", "datasets", "optimizer"):
        cases.append(Case(f"unknown-section-{name}", name, {"lr": 1e-3}))
    cases.append(Case("typo-section-modle", "modle", {"name_or_path": "x"}))
    return cases


def _value_cases(rng: random.Random) -> list[Case]:
    cases = []
    for key, kind in KINDS.items():
        for value in rng.sample(WRONG_TYPES[kind], 2):
            cases.append(Case(f"type-{key}={json.dumps(value)}", key, value))
    for key in NONFINITE_FIELDS:
        for text in (".nan", ".inf", "-.inf"):
            cases.append(Case(f"nonfinite-{key}={text}", key, yaml_value=text))
    for key in ("train.max_steps", "train.batch_size", "train.seed", "data.max_length"):
        cases.append(Case(f"nonfinite-{key}=.inf", key, yaml_value=".inf"))
    cases.append(Case("nonfinite-train.lr=1e400", "train.lr", yaml_value="1.0e+400"))
    for key in HUGE_FIELDS:
        cases.append(Case(f"huge-{key}=10**30", key, 10**30))
    for power in (64, 200):
        cases.append(Case(f"huge-train.seed=2**{power}", "train.seed", 2**power))
    cases.append(Case("huge-train.seed=-2**200", "train.seed", -(2**200)))
    for key, values in OUT_OF_RANGE.items():
        cases += [Case(f"range-{key}={v}", key, v) for v in values]
    for key, values in BAD_ENUMS.items():
        cases += [Case(f"enum-{key}={v}", key, v) for v in values]
    for betas in BAD_BETAS:
        cases.append(Case(f"betas-{betas}", "train.adam_betas", betas))
    for text in ("[.nan, 0.999]", "[0.9, .inf]", "[-.inf, 0.9]"):
        cases.append(Case(f"betas-{text}", "train.adam_betas", yaml_value=text))
    return cases


def _structure_cases(rng: random.Random) -> list[Case]:
    tags = ['!!python/object/apply:os.system ["true"]', "!!python/name:os.system", "!!python/module:os",
            '!!python/object/new:subprocess.Popen [["true"]]']
    cases = [Case(f"tag-{t.split()[0]}", "train.lr", yaml_value=t, names_key=False) for t in tags]
    for i in range(3):
        cases.append(Case(f"binary-{i}", raw=bytes(rng.randrange(256) for _ in range(rng.randint(16, 4096)))))
    cases += [
        Case("binary-nul-bytes", raw=b"train:\n  lr: 0.1\x00\x00\n"),
        Case("utf16-file", raw="train:\n  lr: 0.1\n".encode("utf-16")),
        Case("control-characters", raw=b"train:\n  lr: \x07\x1b[31m\n"),
        Case("top-level-list", raw=b"- model\n- data\n"),
        Case("top-level-int", raw=b"42\n"),
        Case("top-level-string", raw=b"just some words\n"),
        Case("yaml-unclosed", raw=b"train:\n  lr: [1,\n"),
        Case("yaml-tab-indent", raw=b"train:\n\tlr: 0.1\n"),
        Case("yaml-unknown-alias", "train.lr", yaml_value="*nope", names_key=False),
        Case("yaml-unhashable-key", raw=b"? [a, b]\n: 1\n"),
        Case("yaml-int-key", raw=b"1: 2\n"),
        Case("yaml-binary-value", "train.lr", yaml_value="!!binary AAAA"),
        Case("yaml-set-value", "data.train", yaml_value="!!set {a, b}"),
        Case("yaml-date-value", "output.dir", yaml_value="2024-01-01"),
        Case("section-null", "train", None),
        Case("section-string", "train", "fast"),
        Case("section-list", "data", [1, 2]),
        Case("section-int", "model", 5),
        Case("method-int", "method", 5),
        Case("method-list", "method", []),
        Case("method-no-name", "method.name", delete=True),
        Case("objective-no-name", "objective.name", delete=True),
        Case("nested-key-in-leaf", "train.lr", {"value": 0.1}),
        Case("int-mapping-key", "train", {1: 2}, names_key=False),
        Case("data-train-missing-file", "data.train", "/nonexistent/tunelab-fuzz/train.jsonl"),
        Case("data-train-is-a-config", "data.train", "@config", names_key=False),
        Case("data-train-is-a-folder", "data.train", "@folder", names_key=False),
        Case("data-train-name-too-long", "data.train", "x" * 5000, names_key=False),
        Case("chat_template-name-too-long", "data.chat_template", "t" * 5000, names_key=False),
    ]
    return cases


def _override_cases() -> list[Case]:
    items = [("train.lr", "train.lr=nan"), ("train.lr", "train.lr=.inf"), ("train.lr", "train.lr=-inf"),
             ("method.alpha", "method.alpha=NaN"), ("train.max_grad_norm", "train.max_grad_norm=inf"),
             ("train.adam_betas", "train.adam_betas=[1,1]"), ("train.nope", "train.nope=1"),
             ("train.seed", f"train.seed={2**200}"), ("train.lr", "train.lr.x=1"), ("", "nokey"),
             ("", "train..lr=1"), ("", "=1")]
    return [Case(f"override-{o}", key, overrides=(o,), names_key=bool(key)) for key, o in items]


def _bomb(levels: int = 9, width: int = 9) -> str:
    """A flow sequence whose last item expands to width**levels strings ("billion laughs")."""
    names = [f"l{i}" for i in range(levels)]
    parts = [f"&{names[0]} [" + ", ".join(["lol"] * width) + "]"]
    parts += [f"&{n} [" + ", ".join([f"*{prev}"] * width) + "]" for prev, n in zip(names, names[1:], strict=False)]
    return "[" + ", ".join(parts) + "]"


def _bounded_cases() -> list[Case]:
    deep_list = "[" * 10_000 + "]" * 10_000
    deep_map = "{a: " * 10_000 + "1" + "}" * 10_000
    return [
        Case("bomb-train.lr", "train.lr", yaml_value=_bomb(), names_key=False),
        Case("bomb-data.train", "data.train", yaml_value=_bomb(), names_key=False),
        Case("bomb-model.keep_layers", "model.keep_layers", yaml_value=_bomb(), names_key=False),
        Case("bomb-method.target_modules", "method.target_modules", yaml_value=_bomb(), names_key=False),
        Case("bomb-unknown-key", "x_defaults", yaml_value=_bomb(), names_key=False),
        Case("bomb-train.adam_betas", "train.adam_betas", yaml_value=_bomb(), names_key=False),
        Case("bomb-override", overrides=("train.lr=" + _bomb(),), names_key=False),
        Case("recursive-alias", "train.lr", yaml_value="&r [*r, *r]", names_key=False),
        Case("deep-list-train.lr", "train.lr", yaml_value=deep_list, names_key=False),
        Case("deep-map-model.revision", "model.revision", yaml_value=deep_map, names_key=False),
        Case("int-5000-digits-train.seed", "train.seed", yaml_value="9" * 5000, names_key=False),
        Case("int-5000-digits-method.r", "method.r", yaml_value="1" + "0" * 5000, names_key=False),
        Case("file-16mb", "data.train", yaml_value="x" * (16 << 20), names_key=False),
    ]


def _all_cases() -> tuple[list[Case], list[Case]]:
    rng = random.Random(SEED)
    quick = _unknown_and_typo_cases(rng) + _value_cases(rng) + _structure_cases(rng) + _override_cases()
    return quick, _bounded_cases()


QUICK, BOUNDED = _all_cases()
# A run dir's config.yaml is read by another path (`tunelab data check RUN_DIR`, `train RUN_DIR --resume`).
RUN_DIR_PREFIXES = ("section-", "method-", "binary-", "top-level-", "utf16", "yaml-", "typo-section",
                    "nonfinite-train.lr", "huge-train.seed", "betas-[1.0", "unknown-section")
RUN_DIR_CASES = [c for c in QUICK if c.id.startswith(RUN_DIR_PREFIXES)]
TRAIN_CASES = [Case("train-empty-file", raw=b""), Case("train-comment-only", raw=b"# nothing here\n"),
               Case("train-nan-lr", "train.lr", yaml_value=".nan"),
               Case("train-huge-seed", "train.seed", 2**200),
               Case("train-betas-1", "train.adam_betas", [1.0, 0.999]),
               Case("train-negative-max_grad_norm", "train.max_grad_norm", -1.0),
               Case("train-binary", raw=bytes(range(256)) * 4),
               Case("train-output.dir-too-long", "output.dir", "d" * 5000, names_key=False)]  # fmt: skip


# ----------------------------------------------------------------------------- running a case


@pytest.fixture(scope="module")
def base(llama_dir, chat_data) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(chat_data[0]), "eval": str(chat_data[1]), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "objective": {"name": "sft"},
        "train": {"max_steps": 1, "batch_size": 4, "tensorboard": False},
        "output": {"dir": "set per case"},
    }


def write_case(case: Case, base: dict[str, Any], folder: Path) -> Path:
    path = folder / "config.yaml"
    if case.raw is not None:
        path.write_bytes(case.raw)
        return path
    cfg = json.loads(json.dumps(base))
    cfg["output"]["dir"] = str(folder / "run")  # train cases must not meet each other's runs
    if case.key:
        *parents, leaf = case.key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if case.delete:
            node.pop(leaf, None)
        else:
            value = {"@config": str(path), "@folder": str(folder)}.get(case.value, case.value) \
                if isinstance(case.value, str) else case.value
            node[leaf] = MARK if case.yaml_value is not None else value
    text = yaml.safe_dump(cfg, sort_keys=False)
    if case.yaml_value is not None:
        text = text.replace(f"'{MARK}'", case.yaml_value).replace(MARK, case.yaml_value)
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(argv: list[str]) -> tuple[int | str, str, float]:
    """(exit code, stderr, seconds) of `tunelab ARGV` in process; an escaped exception is a traceback."""
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code: int | str = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what a user would see: Python's traceback, exit 1
            err.write(traceback.format_exc())
            code = 1
    return code, err.getvalue(), time.perf_counter() - start


def run_bounded(argv: list[str], folder: Path) -> tuple[int | str, str, float]:
    """`run_cli` in a forked child under a time and memory limit; a hang or a crash is its result."""
    result = folder / "result.json"
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            _limit_memory()
            code, err, _ = run_cli(argv)
            result.write_text(json.dumps({"code": code, "err": err}), encoding="utf-8")
        finally:
            os._exit(0)
    while time.perf_counter() - start < CHILD_TIMEOUT_S:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            seconds = time.perf_counter() - start
            if not result.exists():
                return f"died ({_status(status)})", "", seconds
            r = json.loads(result.read_text(encoding="utf-8"))
            return r["code"], r["err"], seconds
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hang", f"no result after {CHILD_TIMEOUT_S:.0f}s (killed)", time.perf_counter() - start


def _limit_memory() -> None:
    with open("/proc/self/status", encoding="utf-8") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + CHILD_EXTRA_MEMORY, vm + CHILD_EXTRA_MEMORY))


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def assert_user_error(case: Case, result: tuple[int | str, str, float], limit: float = TIME_LIMIT_S) -> None:
    code, err, seconds = result
    lines = [line for line in err.splitlines() if line.strip()]
    shown = "\n".join(lines[-12:])
    assert "Traceback" not in err, f"{case.id}: traceback:\n{shown}"
    assert code == 2, f"{case.id}: exit {code!r}, want 2; stderr:\n{shown}"
    assert lines and lines[0].startswith("error: "), f"{case.id}: no `error:` line:\n{shown}"
    assert len(lines) <= 2, f"{case.id}: {len(lines)} lines on stderr, want at most 2:\n{shown}"
    assert len(lines) == 1 or lines[1].startswith("  fix: "), f"{case.id}: second line is not a fix:\n{shown}"
    assert seconds < limit, f"{case.id}: took {seconds:.1f}s"
    if case.names_key and case.key:
        assert case.key in err, f"{case.id}: the error does not name {case.key}:\n{shown}"


# ----------------------------------------------------------------------------- the tests


def test_enough_cases():
    assert len(QUICK) + len(BOUNDED) + len(TRAIN_CASES) >= 200 and len(RUN_DIR_CASES) >= 20
    ids = [c.id for c in QUICK + BOUNDED + TRAIN_CASES]
    assert len(ids) == len(set(ids))


def test_base_config_is_valid(base, tmp_path):
    """Every case breaks this config in one place: it must pass, or the cases prove nothing."""
    code, err, _ = run_cli(["data", "check", str(write_case(Case("base"), base, tmp_path))])
    assert code == 0, err


@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.id)
def test_bad_config_is_one_clear_error(case, base, tmp_path):
    path = write_case(case, base, tmp_path)
    assert_user_error(case, run_cli(["data", "check", str(path), *case.overrides]))


@pytest.mark.parametrize("case", RUN_DIR_CASES, ids=lambda c: c.id)
def test_bad_config_in_a_run_dir_is_one_clear_error(case, base, tmp_path):
    write_case(case, base, tmp_path)
    assert_user_error(case, run_cli(["data", "check", str(tmp_path), *case.overrides]))


@pytest.mark.parametrize("case", BOUNDED, ids=lambda c: c.id)
def test_hostile_config_is_refused_in_bounded_time(case, base, tmp_path):
    path = write_case(case, base, tmp_path)
    assert_user_error(case, run_bounded(["data", "check", str(path), *case.overrides], tmp_path))


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.id)
def test_train_refuses_before_training(case, base, tmp_path):
    """`tunelab train` checks the whole config before it loads a model (one step, so it is bounded)."""
    path = write_case(case, base, tmp_path)
    assert_user_error(case, run_cli(["train", "-q", str(path)]))


def test_bomb_helper_expands_as_claimed():
    loaded = yaml.safe_load(_bomb(levels=3, width=3))
    assert loaded[2] == [[["lol"] * 3] * 3] * 3
