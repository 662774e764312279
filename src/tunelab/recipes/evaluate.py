"""Evaluate, generate, score: a model or run measured on data, tasks, the forgetting probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.artifacts import load
from tunelab.config import DataConfig, ICLConfig, RAGConfig, Section, explain
from tunelab.data.pipeline import load_tokenized
from tunelab.data.sources import read_records, resolve_source
from tunelab.errors import ConfigError, TunelabError
from tunelab.eval import probe, suite
from tunelab.eval.tasks import load_model_or_run, parse_spec
from tunelab.inference.generation import encode_prompt, generate_ids
from tunelab.inference.loss import evaluate_loss
from tunelab.inference.reward import score_records
from tunelab.modeling.heads import is_reward_model
from tunelab.nonparametric import augment
from tunelab.objectives import OBJECTIVES


def evaluate(
    model_path: str | Path | tuple[nn.Module, PreTrainedTokenizerBase], data: str | None = None, *,
    fmt: str | None = None, max_length: int | None = None, batch_size: int | None = None, all_tokens: bool = False,
    tasks: list[str] | tuple[str, ...] = (), forgetting: bool = False, base: str | Path | None = None,
    limit: int | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
    icl: ICLConfig | dict[str, Any] | None = None, rag: RAGConfig | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Loss and perplexity of a model or run on a dataset (assistant tokens only, unless all_tokens).

    With only `data`: {"loss", "perplexity", "tokens", "data_settings"}: a run is scored with its own
    data settings (max_length, format, packing, chat template, prompt masking) unless `fmt` /
    `max_length` / `all_tokens` override them, so the number matches the run's eval_loss; a model
    that is not a run uses format auto, max_length 1024. With `tasks` (see `evaluate_task`) or
    `forgetting` (see `tunelab.eval.probe.forgetting`; `base` where the model is neither a run nor
    an adapter): one entry per evaluation, keyed by the data path, the task spec and "forgetting";
    the model is loaded once. `batch_size`: 8 for the loss, 32 for tasks unless given.
    `trust_remote_code` / `allow_pickle`: this command's grant (settings in a run dir never grant them).
    `icl` / `rag` (config sections or their dicts): tasks are answered with in-context shots /
    retrieved passages (docs/nonparametric.md)."""
    icl, rag = _section(ICLConfig, icl, "icl"), _section(RAGConfig, rag, "rag")
    if rag is None and not isinstance(model_path, tuple):  # a run trained on retrieved passages is evaluated with them
        run_rag = (probe.run_config(model_path) or {}).get("rag") or {}
        rag = RAGConfig.model_validate(run_rag) if run_rag.get("train") else None
    for spec in tasks:
        parse_spec(spec)  # unknown names fail before a model is loaded
    if data is None and not tasks and not forgetting:
        raise TunelabError("nothing to evaluate", fix="pass a dataset (--data PATH), a task (--task SPEC) or "
                           "--forgetting")
    model, tok = load_model_or_run(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if forgetting:
        base = probe.base_for(model, model_path, base)
    out: dict[str, Any] = {}
    if data is not None:
        dcfg, mask_prompt, settings = data_settings(model_path, data, fmt=fmt, max_length=max_length,
                                                    all_tokens=all_tokens)
        examples = load_tokenized(dcfg, "eval", tok, mask_prompt=mask_prompt, log=lambda s: None).examples
        out[data] = evaluate_loss(model, examples, batch_size=batch_size or 8, pad_id=tok.pad_token_id,
                                  packing=dcfg.packing, max_length=dcfg.max_length)
        out[data]["data_settings"] = settings
        if not tasks and not forgetting:
            return out[data]
    for spec in tasks:
        out[spec] = evaluate_task((model, tok), spec, limit=limit, batch_size=batch_size or 32, icl=icl, rag=rag)
    if forgetting:
        out["forgetting"] = probe.forgetting((model, tok), base, limit=limit, batch_size=batch_size or 32)
    return out


def data_settings(
    model_path: str | Path | tuple[nn.Module, PreTrainedTokenizerBase], data: str, *, fmt: str | None,
    max_length: int | None, all_tokens: bool,
) -> tuple[DataConfig, bool, dict[str, Any]]:
    """The data settings `evaluate` scores `data` with: a run's own (its config.yaml's data section
    and its objective's prompt masking), else the defaults; the arguments given override either."""
    run_cfg = None if isinstance(model_path, tuple) else probe.run_config(model_path)
    fields: dict[str, Any] = {"format": "auto", "max_length": 1024}
    mask_prompt, source = True, "defaults (not a run)"
    if run_cfg is not None:
        fields = {k: v for k, v in run_cfg.get("data", {}).items() if k not in ("train", "eval")}
        mask_prompt = OBJECTIVES[run_cfg["objective"]["name"]].mask_prompt if run_cfg.get("objective", {}).get(
            "name") in OBJECTIVES else True
        source = "the run's config.yaml"
    overridden = [name for name, v in (("format", fmt), ("max_length", max_length)) if v is not None]
    fields.update({k: v for k, v in (("format", fmt), ("max_length", max_length)) if v is not None})
    if all_tokens:
        mask_prompt = False
        overridden.append("all_tokens")
    dcfg = DataConfig(**{**fields, "eval": data, "on_error": "raise", "max_truncated_share": 1.0,
                         "allow_cut_replies": True})
    settings = {"source": source + (f", overridden: {', '.join(overridden)}" if overridden else ""),
                "format": dcfg.format, "max_length": dcfg.max_length, "packing": dcfg.packing,
                "chat_template": dcfg.chat_template or "the tokenizer's", "trained_tokens_only": mask_prompt}
    return dcfg, mask_prompt, settings


def evaluate_task(
    model_or_run: str | Path | tuple[nn.Module, PreTrainedTokenizerBase], spec: str, *, limit: int | None = None,
    batch_size: int = 32, kind: str | None = None, icl: ICLConfig | dict[str, Any] | None = None,
    rag: RAGConfig | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of a model on `tinyworld:<task>[@<split>]`, `tinyworld:probe` or a dataset file."""
    return suite.evaluate_task(model_or_run, spec, limit=limit, batch_size=batch_size, kind=kind,
                               icl=_section(ICLConfig, icl, "icl"), rag=_section(RAGConfig, rag, "rag"))


def _section(cls: type[Section], value: Section | dict[str, Any] | None, name: str) -> Any:
    """A config section given as itself or as a dict (checked like a config's, naming the key)."""
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise ConfigError(explain(e, cls, prefix=name)) from None


@torch.no_grad()
def generate(
    model_path: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
    chat: bool = True, seed: int = 0, trust_remote_code: bool = False, allow_pickle: bool = False,
    icl: ICLConfig | dict[str, Any] | None = None, rag: RAGConfig | dict[str, Any] | None = None,
) -> str:
    """Reply to `prompt` (a user turn through the chat template, when there is one; else raw text).
    Greedy by default; `temperature > 0` samples. `icl` (with its pool) / `rag`: shots / retrieved
    passages before the prompt."""
    tech = suite.technique_for(_section(ICLConfig, icl, "icl"), _section(RAGConfig, rag, "rag"))
    model, tok = load(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if tech.active:
        if not (chat and tok.chat_template):
            raise TunelabError("in-context learning and RAG build chat prompts; this one is raw text",
                               fix="drop --no-chat, or use a model whose tokenizer has a chat template")
        (record,), _ = augment.apply([{"prompt": prompt, "answer": ""}], tok, tech,
                                     budget=tech.budget(model, max_new_tokens))
        ids = encode_prompt(tok, record["messages"][:-1], chat=True)
    else:
        ids = encode_prompt(tok, prompt, chat=chat and bool(tok.chat_template))
    torch.manual_seed(seed)
    (reply,) = generate_ids(model, tok, [ids], max_new_tokens=max_new_tokens,
                            temperature=temperature if temperature > 0 else None)
    return tok.decode(reply, skip_special_tokens=True).strip()  # the template's reply lead (a space) too


def score(
    model_path: str | Path, data: str, *, limit: int | None = None, batch_size: int = 32,
    trust_remote_code: bool = False, allow_pickle: bool = False,
) -> dict[str, Any]:
    """Rewards of a reward model (objective `reward`) for the replies in `data`; see inference/reward.py."""
    model, tokenizer = load(model_path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if not is_reward_model(model):
        raise TunelabError(f"{model_path}: not a reward model (a scalar head)",
                           fix="train one with objective.name=reward and method.name=head, method.num_labels=1")
    records = list(read_records(resolve_source(data)))[:limit]
    return score_records(model, tokenizer, records, batch_size=batch_size)
