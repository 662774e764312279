"""Batched greedy generation and continuation log-likelihoods, the two model calls task metrics need.

Prompts are either raw strings (tokenized as they are, the tokenizer's own special tokens
included) or chat message lists (rendered through the tokenizer's chat template with the
generation prompt). Generation batches are LEFT padded with an attention mask (done here, so the
tokenizer's padding side is never touched), so every row's new tokens start at the same column;
the result equals generating each prompt alone (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import TunelabError
from tunelab.world.chat import IM_END

Prompt = str | list[dict[str, str]]


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of a prompt; a string goes through the chat template as a user turn when `chat`."""
    if isinstance(prompt, str) and not chat:
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError(
            "this task asks chat questions but the tokenizer has no chat template",
            fix="evaluate a model whose tokenizer has a chat template (or fine-tune one with data.chat_template)",
        )
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def reply_lead(tokenizer: Any, template: str | None = None) -> str:
    """The text the chat template (`template`, Jinja source; default the tokenizer's) writes at the
    start of every assistant reply after the generation prompt: tunelab-tiny's is one space, so an
    answer's first word is the token prose uses; most templates have none (''). A generated reply
    carries it; it is formatting, not content, so replies drop it (`drop_lead`)."""
    source = template or getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str) or not source:
        return ""
    if source not in _LEADS:
        user = [{"role": "user", "content": "U"}]
        marker = "\x00"
        try:
            prompt = tokenizer.apply_chat_template(user, chat_template=source, add_generation_prompt=True,
                                                   tokenize=False)
            whole = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": marker}],
                                                  chat_template=source, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render this probe has no lead we can know
            prompt, whole = "", ""
        lead = whole[len(prompt):whole.find(marker)] if whole.startswith(prompt) and marker in whole else ""
        _LEADS[source] = lead if lead.isspace() else ""
    return _LEADS[source]


_LEADS: dict[str, str] = {}  # template source -> its reply lead


def drop_lead(text: str, lead: str) -> str:
    """`text` without the reply lead `lead` when it starts with it."""
    return text[len(lead):] if lead and text.startswith(lead) else text


def reply_text(tokenizer: Any, ids: Sequence[int], lead: str = "") -> str:
    """A reply's text: its ids decoded without special tokens, the chat template's reply lead dropped."""
    return drop_lead(tokenizer.decode(ids, skip_special_tokens=True), lead)


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the generation config's eos ids, the tokenizer's eos and `<|im_end|>`."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if IM_END in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    return list(dict.fromkeys(ids))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 16, batch_size: int = 32,
    chat: bool,
) -> list[str]:
    """Greedy replies to `prompts`, in order, cut at the first stop token, special tokens removed.

    `chat`: render string prompts as a user turn through the chat template (message lists always
    are); False continues raw text."""
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    stops = stop_token_ids(model, tokenizer)
    rows = generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size)
    lead = reply_lead(tokenizer)  # only chat prompts (message lists, or strings when `chat`) end in a reply header
    return [reply_text(tokenizer, until_stop(row, stops), lead if chat or not isinstance(p, str) else "")
            for p, row in zip(prompts, rows, strict=True)]


def generate_ids(
    model: nn.Module, tokenizer: Any, encoded: Sequence[list[int]], *, max_new_tokens: int, batch_size: int = 32,
    temperature: float | None = None, top_k: int | None = None,
) -> list[list[int]]:
    """New token ids after each encoded prompt, in order, cut just AFTER the first stop token (kept).

    Greedy unless `temperature` is given: then sampling from softmax(logits / temperature), over
    the `top_k` most likely tokens when top_k is set (the torch RNG decides: seed it to repeat)."""
    stops = stop_token_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    sample = temperature is not None
    out_rows: dict[int, list[int]] = {}
    with _eval_mode(model), _cache_name_bridge(model):
        for batch in _batches(list(encoded), batch_size, same_length=_virtual_tokens_first(model)):
            input_ids, mask = _left_pad([list(encoded[i]) for i in batch], pad, _device(model))
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                temperature=temperature, top_p=None, top_k=top_k if sample else None, eos_token_id=stops,
                pad_token_id=pad,
            )  # (B, T + new)
            for i, row in zip(batch, out[:, input_ids.shape[1] :].tolist(), strict=True):
                cut = until_stop(row, stops)
                out_rows[i] = row[: len(cut) + 1] if len(cut) < len(row) else cut
    return [out_rows[i] for i in range(len(encoded))]


@contextmanager
def _cache_name_bridge(model: nn.Module) -> Iterator[None]:
    """Let peft's prompt-learning generation see the KV cache under the name it knows.

    peft (0.21) injects the prefix (prefix tuning) or the virtual-token embeddings (prompt,
    P-tuning) by reading and writing `past_key_values` in `prepare_inputs_for_generation`;
    transformers >= 5.24 names the cache `cache` there and in `forward`, and drops
    `past_key_values` when both are set. Without this bridge peft never sees the cache: the prefix
    is ignored and virtual tokens are injected again at every step (measured: greedy replies
    differ from a no-cache greedy reference from the second token on). The bridge renames on the
    way into peft's logic and back on the way to the model; on an older transformers it does nothing."""
    base_prepare = getattr(model, "base_model_prepare_inputs_for_generation", None)
    cfg = getattr(model, "active_peft_config", None)
    if (base_prepare is None or not getattr(cfg, "is_prompt_learning", False)
            or "cache" not in inspect.signature(model.get_base_model().forward).parameters):
        yield
        return
    own = vars(model).get("prepare_inputs_for_generation")  # an instance attribute to put back, if any
    peft_prepare = model.prepare_inputs_for_generation
    model.base_model_prepare_inputs_for_generation = _renaming(base_prepare, "cache", "past_key_values")
    model.prepare_inputs_for_generation = _renaming(peft_prepare, "past_key_values", "cache")
    try:
        yield
    finally:
        model.base_model_prepare_inputs_for_generation = base_prepare
        if own is None:
            del model.prepare_inputs_for_generation  # the class's method again
        else:
            model.prepare_inputs_for_generation = own


def _renaming(fn: Callable[..., dict[str, Any]], old: str, new: str) -> Callable[..., dict[str, Any]]:
    """`fn` whose returned kwargs carry `old`'s value under `new`."""
    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = fn(*args, **kwargs)
        if old in out:
            out[new] = out.pop(old)
        return out
    return call


def _virtual_tokens_first(model: nn.Module) -> bool:
    """peft prompt/P-tuning models put virtual tokens before the (left-padded) input and ignore
    position ids, so padding would shift the input's positions relative to them."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False)) and getattr(cfg, "peft_type", None) != "PREFIX_TUNING"


def _batches(encoded: list[list[int]], size: int, same_length: bool) -> list[list[int]]:
    """Index batches in order; with `same_length`, only prompts of one length share a batch (no padding)."""
    if not same_length:
        return [list(range(s, min(s + size, len(encoded)))) for s in range(0, len(encoded), size)]
    by_len: dict[int, list[int]] = {}
    for i, row in enumerate(encoded):
        by_len.setdefault(len(row), []).append(i)
    return [group[s : s + size] for group in by_len.values() for s in range(0, len(group), size)]


def pad_id(tokenizer: Any) -> int:
    """Padding never reaches the model's attention (masked), so any id works where there is no pad token."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _left_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padded ids and attention mask, so every row's reply starts at the same column."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)  # (B, T)
    return ids, mask


def until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, tokenizer: Any, contexts: Sequence[Prompt], continuations: Sequence[str], *,
    batch_size: int = 32, chat: bool = False,
) -> list[tuple[float, int]]:
    """(summed log-probability, token count) of each continuation following its context.

    The continuation is tokenized on its own (no special tokens) and appended to the context's
    ids, so the context's tokens are the same for every candidate continuation."""
    rows = []
    for ctx, cont in zip(contexts, continuations, strict=True):
        ctx_ids = encode_prompt(tokenizer, ctx, chat)
        cont_ids = list(tokenizer(cont, add_special_tokens=False)["input_ids"])
        rows.append((ctx_ids + cont_ids, len(ctx_ids)))
    pad = pad_id(tokenizer)
    scores: list[tuple[float, int]] = []
    with _eval_mode(model):
        for start in range(0, len(rows), batch_size):
            scores += _score_chunk(model, rows[start : start + batch_size], pad)
    return scores


def _score_chunk(model: nn.Module, rows: list[tuple[list[int], int]], pad: int) -> list[tuple[float, int]]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), right padded
    mask = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)  # positions whose token is a continuation token
    for i, (ids, n_ctx) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        scored[i, n_ctx : len(ids)] = True
    device = _device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logits = logits[:, -input_ids.shape[1]:]  # prompt-learning models prepend virtual-token positions
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts token t+1
    target = input_ids[:, 1:].to(device)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    keep = scored[:, 1:].to(device)
    sums = (token_logp * keep).sum(-1)
    return [(float(s), int(n)) for s, n in zip(sums, keep.sum(-1), strict=True)]
