"""Config sections (pydantic, every one forbids unknown keys) and the YAML / override plumbing.

The bottom layer: it imports nothing of tunelab but errors. The whole run's config, whose
`method` and `objective` sections the registries choose, is `runconfig.RunConfig`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunelab.errors import ConfigError

HUGE = 10**9  # no count in a config (steps, ranks, tokens ...) is this large; larger is a typo
MAX_PROCS = 256  # data.num_proc


class Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite number anywhere in a config is refused, naming the key
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _not_huge(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > HUGE and info.field_name != "seed":
            shown = str(v) if v.bit_length() < 64 else f"a {int(v.bit_length() * 0.30103) + 1}-digit number"
            raise ValueError(f"{shown} is out of range (at most {HUGE:,})")
        return v


class ModelConfig(Section):
    name_or_path: str = Field("tunelab-tiny", description="local dir, hub id, or `tunelab-tiny`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="load .bin/.pt weights (runs pickle code: trust the source)")
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = Field(
        "sdpa", description="the attention kernel: sdpa, eager, or a variable-length one that keeps packed documents "
        "apart inside the kernel instead of through a (T, T) mask: flash_attention_2 (CUDA and the flash-attn "
        "package) or flex_attention (CUDA); where this machine lacks it, one line says so and sdpa runs")
    keep_layers: list[int] | None = Field(
        None, description="keep only these decoder layers (0-based, in order): a smaller student initialised from "
        "the model's own layers, as DistilBERT does; use with method full (the saved model has the kept layers only)")


class TaskSource(Section):
    """One task of a multi-task mixture (O03): an item of `data.train` when it is a list."""

    source: str = Field(description="path: .jsonl/.json/.csv/.parquet, a saved datasets dir or a tinyworld: task")
    task: str | None = Field(None, description="the task's name in metrics (default: from the source, e.g. "
                             "tinyworld:skills@sorting-train -> sorting-train)")
    weight: float | None = Field(None, gt=0, le=1e6, description="sampling weight (p = weight / sum of weights); "
                                 "give every task one or none")
    eval: str | None = Field(None, description="this task's evaluation data: eval_<task>_loss at every eval")

    def name(self) -> str:
        if self.task is not None:
            return self.task
        tail = self.source.rsplit("@", 1)[1] if "@" in self.source else self.source.split(":")[-1]
        return Path(tail).stem if "/" in tail or "." in tail else tail


class DataConfig(Section):
    train: str | list[str | TaskSource] | None = Field(
        None, description="path: .jsonl/.json/.csv/.parquet or a saved datasets dir; or a list of them (multi-task: "
        "items `{source, task, weight, eval}`), sampled by `weight` or by size with `temperature`")
    eval: str | None = None
    temperature: float = Field(
        1.0, gt=0, le=1e6, description="multi-task sampling without weights: p(task) proportional to n^(1/T) "
        "(1: proportional to size, large: uniform over tasks)")
    format: str = Field("auto", description="auto (detected), or a registered format (data/formats/): text, "
                        "instruction, chat, preference, ranking, prompt, classification")
    max_length: int = Field(512, gt=1, le=10**7)
    packing: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    overlength: Literal["truncate", "drop", "raise"] = "truncate"
    max_truncated_share: float = Field(
        0.05, ge=0.0, le=1.0, description="a run stops when truncation would cut more than this share of the "
        "trained tokens (1 = never)")
    allow_cut_replies: bool = Field(
        False, description="let truncation cut the end of a chat/instruction reply (its end-of-turn token); by "
        "default a run stops, since the model would learn not to stop")
    chat_template: str | None = Field(
        None, description="built-in template name or a .jinja file; default: the tokenizer's own"
    )
    cache: bool = Field(True, description="keep the tokenized data in $TUNELAB_CACHE/data, keyed by the files' "
                        "bytes, these settings and the tokenizer: a second run on the same data skips tokenizing")
    num_proc: int | None = Field(
        None, description="processes that tokenize a file's first pass (1: this one only); unset: 1 for files under "
        "64 MB, else one per CPU, at most 8. The result is the same whatever the number")
    streaming: bool = Field(
        False, description="read and tokenize the training file a window of records at a time while the run trains, "
        "never the whole file (a .jsonl file of any size; needs train.max_steps; nothing cached); see docs/data.md")
    stream_window: int = Field(
        10_000, ge=1, le=10**7, description="data.streaming: records per window; the order is shuffled within a "
        "window, and memory holds one")


    @field_validator("num_proc")
    @classmethod
    def _processes(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_PROCS:
            raise ValueError(f"{v} processes: give 1 to {MAX_PROCS} (1: tokenize in this process only), or leave it "
                             "unset to choose by the file's size and the CPUs")
        return v

    @field_validator("train")
    @classmethod
    def _mixture(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("an empty list of training sources; give a path, or one item per task")
        items = [TaskSource(source=x) if isinstance(x, str) else x for x in v]
        names = [t.name() for t in items]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"task name{'s' if len(twice) > 1 else ''} {', '.join(map(repr, twice))} given to more "
                             "than one source; set `task:` on each item to tell them apart")
        weighted = [t.weight is not None for t in items]
        if any(weighted) and not all(weighted):
            raise ValueError("some tasks have a weight and some do not; give every task a weight, or none (then "
                             "data.temperature sets the mix)")
        return items

    @model_validator(mode="after")
    def _one_kind_of_eval(self) -> DataConfig:
        if self.eval is not None and any(t.eval is not None for t in self.tasks()):
            raise ValueError("data.eval and per-task `eval:` are both set; evaluate per task (the overall eval loss is "
                             "their token-weighted mean) or on data.eval, not both")
        return self

    def tasks(self) -> list[TaskSource]:
        """The tasks of a multi-task `train` list ([] for a single source)."""
        return list(self.train) if isinstance(self.train, list) else []  # type: ignore[arg-type]

    def for_task(self, task: TaskSource) -> DataConfig:
        """This data section with one task's source as `train` and its `eval`."""
        return self.model_copy(update={"train": task.source, "eval": task.eval})


class ICLConfig(Section):
    """In-context learning (N01): k solved examples ("shots") put before each question at evaluation
    and generation; nothing trains. Off while k is 0."""

    k: int = Field(0, ge=0, le=256, description="shots per question (0: off)")
    select: Literal["random", "fixed", "similar"] = Field(
        "random", description="random: k drawn per question; fixed: the same k for every question; similar: "
        "the k whose questions are nearest by BM25")
    pool: str | None = Field(None, description="the solved examples shots come from (a dataset file or tinyworld "
                             "task); default: the evaluated task's train split")
    order: Literal["best_last", "best_first", "random"] = Field(
        "best_last", description="where the most relevant shot stands: next to the question (best_last) or first")
    format: Literal["turns", "text"] = Field(
        "turns", description="turns: each shot a user/assistant exchange before the question; text: all shots "
        "and the question in one user message")
    max_length: int | None = Field(None, gt=1, le=10**7, description="the prompt's token budget (default: the "
                                   "model's context minus the reply); whole shots are dropped to fit, never the "
                                   "question")
    seed: int = 0


class RAGConfig(Section):
    """Retrieval-augmented generation (N02): passages retrieved from an index (`tunelab rag index`) put
    before each question at evaluation and generation. Off while index is unset."""

    index: str | None = Field(None, description="an index folder written by `tunelab rag index`")
    k: int = Field(3, ge=1, le=1000, description="passages per question")
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    encoder: str | None = Field(None, description="dense/hybrid: the encoder the index was built with "
                                "(default: the index's own)")
    max_length: int | None = Field(None, gt=1, le=10**7, description="the prompt's token budget (default: the "
                                   "model's context minus the reply); the lowest-ranked passages are dropped "
                                   "to fit, never the question")
    train: bool = Field(False, description="also put retrieved passages into the training prompts (a generator "
                        "that learns to use them: RAG + fine-tuning)")
    template: str = Field(
        "{passages}\n\n{question}", description="the question's user turn: {passages} (one `[n] text` line per "
        "passage, best first) and {question}")

    @model_validator(mode="after")
    def _train_needs_index(self) -> RAGConfig:
        if self.train and self.index is None:
            raise ValueError("rag.train puts retrieved passages into training prompts: set rag.index too")
        return self

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        missing = [p for p in ("{passages}", "{question}") if p not in v]
        if missing:
            raise ValueError(f"the template must contain {' and '.join(missing)}")
        try:
            v.format(passages="", question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{passages}} and {{question}} may be placeholders (write {{{{ for a brace): "
                             f"{e}") from None
        return v


class MethodConfig(Section):
    """Base of every method's config; subclasses live next to their method."""

    name: str


class ObjectiveConfig(Section):
    """Base of every objective's config; subclasses live next to their objective."""

    name: str

    def check_run(self, run: Any) -> None:
        """Raise ValueError where the rest of the run's config (`run`: the RunConfig) cannot serve
        this objective; called when a whole config is built."""


class TrainConfig(Section):
    max_steps: int | None = Field(None, gt=0, le=10**9, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, le=10**6, description="sequences (packed rows when packing) per micro-batch")
    grad_accum: int = Field(1, gt=0, le=10**6)
    lr: float = Field(2e-4, gt=0, le=100, description="peak learning rate (above 100 is a typo, not a schedule)")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int | float = Field(0, ge=0, description="steps (int) or a fraction of all steps (float < 1)")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="final lr / peak lr for cosine and linear")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's beta1, beta2, each in [0, 1)")
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip threshold; null disables clipping")
    seed: int = Field(42, ge=0, lt=2**63, description="drives python, numpy, torch and the data order")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    eval_every: int = Field(0, ge=0, description="steps between evals; 0: only at the end")
    select_best: bool = Field(
        False, description="the final model is the weights of the evaluation (every eval_every steps and at the "
        "end) with the lowest eval loss: early stopping by selection, needs data.eval")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_last: int = Field(2, ge=2)
    nonfinite: Literal["halt", "skip"] = "halt"
    max_consecutive_skips: int = Field(5, gt=0)
    log_every: int = Field(1, gt=0)
    tensorboard: bool = True
    distributed: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="how several processes (--nproc, torchrun, accelerate launch) share the model: ddp "
        "(each holds all of it), fsdp (FSDP2: each holds a shard; methods full and lora), deepspeed_zero2/3 "
        "(writes RUN/deepspeed.json; not run by the loop yet). One process ignores it")
    dist_timeout: float = Field(
        600.0, gt=0, description="seconds a process waits in a collective (all-reduce, gather) for the others "
        "before it gives up with a message naming the last checkpoint: a process that died without closing its "
        "connections (a lost machine) cannot hold the rest longer. One process ignores it")
    # GPU speed switches (docs/training.md): each computes what the plain path does, within float rounding, and
    # where this machine cannot run it one line says so and the plain path runs
    fused_optimizer: bool = Field(
        False, description="AdamW as one fused kernel over all parameters (torch's fused=True; CPU and CUDA); "
        "bitsandbytes' paged optimizers (QLoRA's default) keep their own")
    liger: bool = Field(
        False, description="liger-kernel's Triton kernels for RMSNorm, RoPE and SwiGLU in the model (Llama, Qwen, "
        "Mistral, Gemma, Phi-3 ...); needs CUDA and `pip install liger-kernel`")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (inductor): needs a C++ compiler on CPU, Triton on "
        "CUDA; the first steps are slower while it compiles")

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _fsdp_combinations(self) -> TrainConfig:
        if self.distributed == "fsdp" and self.select_best:
            raise ValueError("select_best keeps a copy of the best weights, which FSDP holds in shards: "
                             "set select_best=false or distributed=ddp")
        if self.distributed == "fsdp" and self.precision == "fp16":
            raise ValueError("fp16 under FSDP needs a sharded loss scaler tunelab does not run: use precision=bf16")
        return self

    @field_validator("warmup")
    @classmethod
    def _warmup_fraction(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v >= 1:
            raise ValueError("a float warmup is a fraction of all steps and must be < 1; use an int for steps")
        return v


class OutputConfig(Section):
    dir: str = "runs/run"


# ----------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "method.target_modules=[q_proj,v_proj]"]` -> nested dict (values as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"bad override {item!r}", fix="write overrides as section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int past Python's digit limit
            value = raw
        if _expanded_size(value, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise ConfigError(f"override {key}: expands to more than {MAX_CONFIG_VALUES:,} values through YAML "
                              "aliases", fix="write the value without repeated aliases")
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[leaf] = value
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "assets" / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (`tunelab train sft-lora` finds one by name)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """A config file: `path` itself when it exists, else a shipped config of that name (`sft-lora`,
    `sft-lora.yaml`); a name that is neither is an error listing the shipped ones."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    shipped = SHIPPED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"{p}: no such config file, and no shipped config of that name",
                      fix="pass the path of a YAML file, or a shipped config: " + ", ".join(shipped_configs()))


MAX_CONFIG_BYTES = 1 << 20  # a config is a small text file
MAX_CONFIG_VALUES = 100_000  # after YAML aliases are expanded: refuses "billion laughs" alias bombs


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, safely: safe_load (no Python tags), text only, bounded size,
    bounded alias expansion. Every failure is a ConfigError naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file", fix="pass the path of a YAML file, e.g. configs/sft-lora.yaml")
    data = p.read_bytes()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {len(data):,} bytes is not a config (at most {MAX_CONFIG_BYTES:,})",
                          fix="pass a YAML config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (invalid UTF-8 at byte {e.start})", fix="pass a YAML config file") \
            from None
    if "\x00" in text:
        raise ConfigError(f"{p}: not a text file (it holds NUL bytes)", fix="pass a YAML config file")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except ValueError as e:  # an integer past Python's digit limit
        raise ConfigError(f"{p}: not a usable config ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, method, ...)")
    if _expanded_size(raw, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise ConfigError(f"{p}: expands to more than {MAX_CONFIG_VALUES:,} values through YAML aliases "
                          "(an alias bomb, or a recursive alias)", fix="write the config without repeated aliases")
    return raw


def _expanded_size(value: Any, cap: int) -> int:
    """Values in `value` counting every reference to a shared node again, as code walking it would;
    stops counting past `cap` (so a recursive structure ends too)."""
    n, stack = 0, [value]
    while stack and n <= cap:
        v = stack.pop()
        n += 1
        if isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            stack += list(v)
    return n


def pick_config(kind: str, value: Any, registry: dict[str, Any]) -> Any:
    """Validate one `method`/`objective` section with the config class its `name` selects."""
    names = ", ".join(sorted(registry))
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{kind}.name: missing; registered {kind}s: {names}")
    spec = registry.get(value["name"])
    if spec is None:
        raise ConfigError(f"{kind}.name: unknown {kind} {value['name']!r}{did_you_mean(value['name'], registry)}; "
                          f"registered: {names}")
    try:
        return spec.config_cls.model_validate(value)
    except ValidationError as e:
        raise ConfigError(explain(e, spec.config_cls, prefix=kind)) from None


# The registered names, known without importing a method or objective (their modules import torch):
# a misspelt name is caught in a fraction of a second. tests/test_cli.py keeps them equal to the registries.
METHOD_NAMES = ("adalora", "adapters", "bitfit", "diff_pruning", "dylora", "features", "full", "head", "krona",
                "lora", "lst", "ltsft", "mpt", "partial", "pasta", "peft", "prefix", "prompt", "ptuning", "qlora",
                "threshold_mask")
OBJECTIVE_NAMES = ("classify", "contrastive", "distill", "dpo", "grpo", "kto", "lm", "orpo", "ppo", "reward", "rloo",
                   "sft", "simpo")


# Sections of the configs of regimes (recipes over many runs), which `train` does not take
REGIME_SECTIONS = {"stages": ("a continual-learning", "tunelab continual CONFIG --out DIR"),
                   "continual": ("a continual-learning", "tunelab continual CONFIG --out DIR"),
                   "meta": ("a meta-learning", "tunelab meta CONFIG --out DIR")}


class _Sections(Section):
    """A whole config's sections but `method` and `objective`, whose keys depend on their registries."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: Any = None
    objective: Any = None
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    icl: ICLConfig = ICLConfig()
    rag: RAGConfig = RAGConfig()


def check_before_import(raw: dict[str, Any], source: str = "<config>") -> None:
    """What can be checked without torch: unknown sections and keys, values of the model, data, train and
    output sections, and the method's and objective's names. The full check (`build_config`) follows."""
    regime = next((REGIME_SECTIONS[k] for k in REGIME_SECTIONS if k in raw), None)
    if regime is not None:
        keys = " and ".join(f"`{k}:`" for k in REGIME_SECTIONS if k in raw)
        raise ConfigError(f"{source}: {regime[0]} config (it has {keys}); run it with `{regime[1]}`")
    problems = []
    for kind, names in (("method", METHOD_NAMES), ("objective", OBJECTIVE_NAMES)):
        value = raw.get(kind)
        name = value if isinstance(value, str) else value.get("name") if isinstance(value, dict) else None
        if isinstance(name, str) and name not in names:
            problems.append(f"{kind}.name: unknown {kind} {name!r}{did_you_mean(name, names)}; "
                            f"registered: {', '.join(sorted(names))}")
    try:
        _Sections.model_validate(raw)
    except ValidationError as e:
        problems += explain(e, _Sections).splitlines()
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))


def explain(e: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """A pydantic error as one `key: problem` line per key (a union's branches and a list's items
    joined), unknown keys with the allowed ones."""
    by_key: dict[str, list[str]] = {}
    for err in e.errors():
        parts = [prefix] if prefix else []
        parts += _key_parts(err["loc"])
        loc = ".".join(parts) or "config"  # a cross-section check of the whole config has no key
        if err["type"] == "extra_forbidden":
            allowed = _allowed(model, err["loc"])
            text = f"unknown key{did_you_mean(str(err['loc'][-1]), allowed.split(', '))}; allowed: {allowed}"
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            text = err["msg"].removeprefix("Value error, ") + shown
        if text not in by_key.setdefault(loc, []):
            by_key[loc].append(text)
    return "\n".join(f"{loc}: {'; or '.join(texts)}" for loc, texts in by_key.items())


def _key_parts(loc: tuple[Any, ...]) -> list[str]:
    """The config keys of an error location, without list indices and pydantic's type tags
    (`list[str]`, `function-after[...]`, `str` ...), so that every error about one key shares it."""
    out = []
    for p in loc:
        if isinstance(p, int) or "[" in str(p) or str(p) in _TYPE_TAGS:
            break
        out.append(str(p))
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "literal"}


def did_you_mean(name: object, known: Any) -> str:
    """` (did you mean 'lora'?)` for a near miss among `known` names, else ""."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if ann is not None and isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return "see docs/config.md"
    return ", ".join(model.model_fields)
