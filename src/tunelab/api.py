"""tunelab's Python API; the CLI mirrors it one command per function.

    import tunelab
    result = tunelab.train("configs/sft-lora.yaml", ["train.max_steps=50"])
    print(result.run_dir, result.metrics)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from tunelab import owned
from tunelab.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    build_config,
    deep_merge,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)
from tunelab.data.pipeline import load_tokenized
from tunelab.data.report import check_report
from tunelab.errors import ResumeError, TunelabError
from tunelab.eval.metrics import evaluate_loss
from tunelab.methods import METHODS, count_parameters
from tunelab.methods.artifacts import is_delta, load_delta, load_delta_config, save_artifact
from tunelab.models import check_weight_files, load_model, load_tokenizer, model_config, resolve_path
from tunelab.objectives import OBJECTIVES
from tunelab.training import checkpoint
from tunelab.training.loop import Loop, TrainResult
from tunelab.training.progress import Reporter
from tunelab.training.state import read_meta, seed_everything
from tunelab.world.resolve import is_tinyworld, resolve_task

# Keys that may change between a run and its resume without changing what is computed.
RESUME_SAFE = {
    "train.eval_every", "train.save_every", "train.keep_last", "train.log_every", "train.tensorboard",
    "train.nonfinite", "train.max_consecutive_skips", "output.dir",
}

ConfigLike = RunConfig | str | Path | dict[str, Any] | None


def resolve_config(config: ConfigLike, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig, a dict, a YAML path or a run directory (its config.yaml), plus overrides."""
    if isinstance(config, RunConfig):
        config = config.to_dict()
    if isinstance(config, dict):
        return build_config(deep_merge(config, parse_overrides(overrides or [])))
    if config is not None and Path(config).is_dir():
        config = Path(config) / "config.yaml"
    return load_config(config, overrides)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUME_SAFE)


# Everything tunelab writes at the top of a run dir: `--overwrite` deletes these and nothing else.
RUN_ENTRIES = frozenset({"config.yaml", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "final",
                         "final.tmp-save", "final.old-save", "rollouts.jsonl", "reward_curve.png", "demo.json"})


def _prepare_run_dir(cfg: RunConfig, resume: bool, allow_changed: bool, overwrite: bool,
                     force: bool = False) -> Path | None:
    """Returns the checkpoint to resume from (None for a fresh run). A fresh run claims its folder
    (owned.claim): an earlier run there is deleted only with `overwrite`, and only its own entries."""
    run_dir = Path(cfg.output.dir)
    ckpt_root = run_dir / "checkpoints"
    if resume:
        ckpt = checkpoint.latest(ckpt_root)
        if ckpt is None:
            raise ResumeError(f"{run_dir}: no complete checkpoint to resume", fix="start the run without --resume")
        changed = changed_keys(read_yaml(run_dir / "config.yaml"), cfg.to_dict())
        if changed and not allow_changed:
            raise ResumeError(
                f"{run_dir}: the config differs from the run's in {', '.join(changed)}; resuming would not "
                "continue the same run",
                fix="resume with the run's own config (tunelab train RUN_DIR --resume), or pass --allow-changed",
            )
        return ckpt
    holds_run = owned.state(run_dir, "run", RUN_ENTRIES) == "owned" and any(
        (run_dir / e).exists() for e in owned.owned_entries(run_dir, RUN_ENTRIES))
    if holds_run and not overwrite:
        raise ResumeError(
            f"{run_dir} already holds a run",
            fix="pass --resume to continue it, --overwrite to start over, or set output.dir elsewhere",
        )
    owned.claim(run_dir, "run", sorted(RUN_ENTRIES), what="output.dir", replace=True, force=force,
                legacy=RUN_ENTRIES)
    return None


def train(
    config: ConfigLike, overrides: list[str] | None = None, *, resume: bool = False,
    allow_changed: bool = False, overwrite: bool = False, quiet: bool = False, force: bool = False,
) -> TrainResult:
    """Train per the config; returns the run directory, its status and final metrics. `force`: write
    the run into a non-empty folder tunelab did not make, beside its files (none is deleted)."""
    cfg = resolve_config(config, overrides)
    if cfg.data.train is None:
        raise TunelabError("data.train is not set", fix="set data.train to a dataset path")
    ckpt = _prepare_run_dir(cfg, resume, allow_changed, overwrite, force)
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(run_dir, quiet=quiet, log_every=cfg.train.log_every)
    seed_everything(cfg.train.seed)

    objective = OBJECTIVES[cfg.objective.name]
    tokenizer = load_tokenizer(cfg.model)
    kw = {"mask_prompt": objective.mask_prompt, "formats": objective.formats, "log": reporter.say}
    if getattr(cfg.objective, "labels", None) is not None:  # classification: the class order
        kw["labels"] = cfg.objective.labels
    train_data = load_tokenized(cfg.data, "train", tokenizer, **kw)
    eval_data = load_tokenized(cfg.data, "eval", tokenizer, **kw) if cfg.data.eval else None

    model = METHODS[cfg.method.name].apply(load_model(cfg.model), cfg.method)
    trainable, total = count_parameters(model)
    reporter.say(
        f"{cfg.method.name} on {cfg.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f}%); {len(train_data.examples):,} training examples"
    )
    save_config(cfg, run_dir / "config.yaml")
    loop = Loop(cfg, run_dir, model, train_data.examples, eval_data.examples if eval_data else None,
                tokenizer.pad_token_id, train_data.fingerprint, reporter, tokenizer)
    if ckpt is not None:
        if read_meta(ckpt)["data_fingerprint"] != train_data.fingerprint and not allow_changed:
            raise ResumeError(
                f"{ckpt}: the training data changed since this checkpoint; resuming would replay or skip samples",
                fix="restore the original data, or pass --allow-changed",
            )
        loop.restore(ckpt)
        reporter.say(f"resumed from {ckpt} (step {loop.step} of {loop.total_steps})")
    result = loop.run()
    if result.status == "completed":
        save_artifact(loop.accelerator.unwrap_model(loop.model), tokenizer, cfg.method, cfg.model, run_dir / "final")
        (run_dir / "summary.json").write_text(
            json.dumps({"steps": result.steps, "trainable": trainable, "total": total, **result.metrics},
                       indent=1), encoding="utf-8")
        reporter.say(f"done: {run_dir}/final  " + _fmt(result.metrics))
    return result


def _fmt(m: dict[str, float]) -> str:
    keys = ("loss", "eval_loss", "eval_perplexity")
    return "  ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


# ----------------------------------------------------------------------------- loading results


def load(
    path: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False, training: bool = False,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A run dir (its final model), a peft adapter dir, a model dir or a hub id -> (model, tokenizer)."""
    p = Path(path)
    if (p / "config.yaml").is_file() and (p / "final").is_dir():
        model_cfg = resolve_config(p).model
        final = p / "final"
        if model_cfg.keep_layers is not None and not is_delta(final) and not (final / "adapter_config.json").is_file():
            model_cfg = model_cfg.model_copy(update={"keep_layers": None})  # a saved full model has only those layers
        return _load_model_dir(final, model_cfg, training)
    if (p / "config.yaml").is_file():
        raise TunelabError(f"{p}: the run has no final model yet", fix="finish it with tunelab train RUN --resume")
    cfg = ModelConfig(name_or_path=str(path), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return _load_model_dir(p, cfg, training)


def _load_model_dir(p: Path, cfg: ModelConfig, training: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    check_weight_files(p)
    if is_delta(p):
        return load_delta(p, training), load_tokenizer(cfg, str(p))
    adapter = p / "adapter_config.json"
    if adapter.is_file():
        base_name = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        base_cfg = cfg.model_copy(update={"name_or_path": base_name}) if cfg.name_or_path == str(p) else cfg
        base = load_model(base_cfg, training=training)
        model = PeftModel.from_pretrained(base, str(p), is_trainable=training)
        return model, load_tokenizer(base_cfg, str(p))
    path = resolve_path(str(p)) if p.exists() else resolve_path(cfg.name_or_path)
    return load_model(cfg, path, training=training), load_tokenizer(cfg, path)


def evaluate(
    model_path: str | Path | tuple[nn.Module, PreTrainedTokenizerBase], data: str | None = None, *, fmt: str = "auto",
    max_length: int = 1024, batch_size: int | None = None, all_tokens: bool = False,
    tasks: list[str] | tuple[str, ...] = (), forgetting: bool = False, base: str | Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Loss and perplexity of a model or run on a dataset (assistant tokens only, unless all_tokens).

    With only `data`: {"loss", "perplexity", "tokens"}. With `tasks` (see `evaluate_task`) or
    `forgetting` (see `tunelab.eval.probe.forgetting`; `base` where the model is neither a run nor
    an adapter): one entry per evaluation, keyed by the data path, the task spec and "forgetting";
    the model is loaded once. `batch_size`: 8 for the loss, 32 for tasks unless given."""
    from tunelab.eval import probe
    from tunelab.eval.tasks import load_model_or_run, parse_spec

    for spec in tasks:
        parse_spec(spec)  # unknown names fail before a model is loaded
    if data is None and not tasks and not forgetting:
        raise TunelabError("nothing to evaluate", fix="pass a dataset (--data PATH), a task (--task SPEC) or "
                           "--forgetting")
    model, tok = load_model_or_run(model_path)
    if forgetting:
        base = probe.base_for(model, model_path, base)
    out: dict[str, Any] = {}
    if data is not None:
        dcfg = DataConfig(eval=data, format=fmt, max_length=max_length)  # type: ignore[arg-type]
        examples = load_tokenized(dcfg, "eval", tok, mask_prompt=not all_tokens, log=lambda s: None).examples
        out[data] = evaluate_loss(model, examples, batch_size=batch_size or 8, pad_id=tok.pad_token_id,
                                  packing=False, max_length=max_length)
        if not tasks and not forgetting:
            return out[data]
    for spec in tasks:
        out[spec] = evaluate_task((model, tok), spec, limit=limit, batch_size=batch_size or 32)
    if forgetting:
        out["forgetting"] = probe.forgetting((model, tok), base, limit=limit, batch_size=batch_size or 32)
    return out


def evaluate_task(
    model_or_run: str | Path | tuple[nn.Module, PreTrainedTokenizerBase], spec: str, *, limit: int | None = None,
    batch_size: int = 32, kind: str | None = None,
) -> dict[str, Any]:
    """Metrics of a model on `tinyworld:<task>[@<split>]`, `tinyworld:probe` or a dataset file."""
    from tunelab.eval import tasks

    return tasks.evaluate_task(model_or_run, spec, limit=limit, batch_size=batch_size, kind=kind)


@torch.no_grad()
def generate(
    model_path: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    chat: bool = True, seed: int = 0,
) -> str:
    """Reply to `prompt` (a user turn through the chat template, when there is one; else raw text).
    Greedy by default; `temperature > 0` samples."""
    from tunelab.eval.generation import encode_prompt, generate_ids

    model, tok = load(model_path)
    ids = encode_prompt(tok, prompt, chat=chat and bool(tok.chat_template))
    torch.manual_seed(seed)
    (reply,) = generate_ids(model, tok, [ids], max_new_tokens=max_new_tokens,
                            temperature=temperature if temperature > 0 else None)
    return tok.decode(reply, skip_special_tokens=True).strip()


def score(model_path: str | Path, data: str, *, limit: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Rewards of a reward model (objective `reward`) for the replies in `data`; see eval/reward.py."""
    from tunelab.data.sources import read_records
    from tunelab.eval.reward import is_reward_model, score_records

    model, tokenizer = load(model_path)
    if not is_reward_model(model):
        raise TunelabError(f"{model_path}: not a reward model (a scalar head)",
                           fix="train one with objective.name=reward and method.name=head, method.num_labels=1")
    path = str(resolve_task(data)) if is_tinyworld(data) else data
    records = list(read_records(path))[:limit]
    return score_records(model, tokenizer, records, batch_size=batch_size)


def export(run: str | Path, out: str | Path, *, merge: bool = False, force: bool = False) -> Path:
    """Write a run's final model to `out`: as it is (adapter, delta or full model), or with
    `merge` folded into the base weights as a plain transformers model.

    Written beside `out` and renamed into place (owned.install): a previous export there is
    replaced, a folder tunelab did not write is refused (with `force`: written beside its files)."""
    src = Path(run) / "final" if (Path(run) / "config.yaml").is_file() else Path(run)
    out = Path(out)
    owned.preflight(out, "export", what="--out", force=force)
    check_weight_files(src)
    tmp = owned.staging(out)
    try:
        if merge:
            _save_merged(run, src, tmp)
        else:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(owned.MARKER))
    except BaseException:
        owned.remove(tmp)
        raise
    return owned.install(tmp, out, "export", what="--out", force=force)


def _save_merged(run: str | Path, src: Path, out: Path) -> None:
    model, tok = load(run)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    elif is_delta(src):
        method_cfg = load_delta_config(src)
        if not METHODS[method_cfg.name].mergeable:
            raise TunelabError(f"method {method_cfg.name!r} cannot be merged into the base weights",
                               fix="export without --merge: the method's own format loads with tunelab.load")
        model = METHODS[method_cfg.name].merge(model, method_cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def data_check(config: ConfigLike, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = resolve_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model)
    return check_report(cfg.data, tokenizer, OBJECTIVES[cfg.objective.name].mask_prompt)


def method_cost(model: str, method: str, overrides: list[str] | None = None) -> dict[str, int]:
    """Trainable and total parameters of `method` on `model`, from the model's config alone: the
    model is built on the meta device, so no weight is downloaded or allocated (a 7B config takes
    seconds). `overrides` set method keys, e.g. `method.r=4`."""
    raw = deep_merge({"model": {"name_or_path": model}, "method": {"name": method}}, parse_overrides(overrides or []))
    cfg = build_config(raw, "<command line>")
    hf_cfg = model_config(cfg.model.name_or_path, cfg.model.trust_remote_code)
    with torch.device("meta"):
        built = METHODS[cfg.method.name].apply(AutoModelForCausalLM.from_config(hf_cfg), cfg.method)
    trainable, total = count_parameters(built)
    return {"trainable": trainable, "total": total}


def methods(model: str | None = "tunelab-tiny") -> list[dict[str, Any]]:
    """The registry; with `model`, each method's trainable parameters on it at default settings."""
    rows = []
    for s in sorted(METHODS.values(), key=lambda s: s.name):
        row = {"name": s.name, "family": s.family, "backend": s.backend, "mergeable": s.mergeable,
               "paper": s.paper, "summary": s.summary}
        if model is not None:
            try:
                row["trainable"] = method_cost(model, s.name)["trainable"]
            except TunelabError:
                row["trainable"] = None
        rows.append(row)
    return rows
