"""Scoring with a reward model (a scalar head, objective `reward`): the rewards of a batch, of
(prompt, reply) pairs, of records (`tunelab score`), and a judge of two sets of replies.

A reply is scored as the conversation prompt + assistant reply, rendered with the tokenizer's chat
template exactly as the reward model was trained (data/preference.py), at its last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tunelab.data.collate import collate
from tunelab.data.formats import detect_format, validate_record
from tunelab.data.preference import ranked_pairs, reply_example
from tunelab.data.templates import resolve_template
from tunelab.errors import DataError, TunelabError
from tunelab.inference.generation import pad_id

Prompt = str | list[dict[str, str]]


def reward_scores(model: nn.Module, batch: dict[str, torch.Tensor], out: Any = None) -> torch.Tensor:
    """(rows,) scalar rewards of a scalar-head model (`out`: its output for the batch, if already run)."""
    out = out if out is not None else model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            labels=batch["labels"])
    logits = out.logits
    if logits.dim() != 2 or logits.shape[1] != 1:
        raise TunelabError(
            f"objective reward needs a scalar head (logits (batch, 1)), got logits of shape {tuple(logits.shape)}",
            fix="use method.name=head with method.num_labels=1 (method.body: full or frozen)")
    return logits[:, 0].float()


@torch.no_grad()
def rewards_of(
    model: nn.Module, tokenizer: Any, items: Sequence[tuple[Prompt, str]], *, batch_size: int = 32,
    max_length: int = 1024,
) -> list[float]:
    """The reward of every (prompt, reply), in order."""
    template = resolve_template(None, tokenizer)
    examples = [reply_example(p, r, tokenizer, template, "") for p, r in items]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [[replace(ex, input_ids=ex.input_ids[:max_length], labels=ex.labels[:max_length])] for ex in chunk]
        batch = {k: v.to(device) for k, v in collate(rows, pad_id=pad_id(tokenizer), packed=False).items()}
        out += reward_scores(model, batch).tolist()
    model.train(was_training)
    return out


def score_fn(model: nn.Module, tokenizer: Any, batch_size: int = 32) -> Any:
    """A `ScoreFn` for eval/tasks.py's preference accuracy: (reward, 1) per (context, continuation)."""
    def score(contexts: list[Prompt], continuations: list[str], chat: bool) -> list[tuple[float, int]]:
        return [(r, 1) for r in rewards_of(model, tokenizer, list(zip(contexts, continuations, strict=True)),
                                           batch_size=batch_size)]
    return score


def score_records(
    model: nn.Module, tokenizer: Any, records: Sequence[tuple[str, dict[str, Any]]], *, batch_size: int = 32
) -> dict[str, Any]:
    """Rewards of `(where, record)` records: preference (chosen/rejected), ranking (responses) or
    `{"prompt", "response"}`. Returns {"records": [...], "pairs", "accuracy"} (pairs from ranked records)."""
    items: list[tuple[Prompt, str]] = []
    shapes: list[tuple[str, dict[str, Any], list[str]]] = []
    for where, r in records:
        fmt = detect_format(r) if isinstance(r, dict) else None
        if fmt in ("preference", "ranking") and validate_record(r, fmt) is None:
            replies = [r["chosen"], r["rejected"]] if fmt == "preference" else list(r["responses"])
        elif isinstance(r, dict) and "prompt" in r and isinstance(r.get("response"), str):
            fmt, replies = "response", [r["response"]]
        else:
            raise DataError(f"{where}: not a scorable record", fix='give {"prompt", "response"}, '
                            '{"prompt", "chosen", "rejected"} or {"prompt", "responses": [best, ..., worst]}')
        items += [(r["prompt"], x) for x in replies]
        shapes.append((fmt, r, replies))
    rewards = iter(rewards_of(model, tokenizer, items, batch_size=batch_size))
    out, wins, pairs = [], 0, 0
    for fmt, r, replies in shapes:
        scores = dict(zip(replies, (next(rewards) for _ in replies), strict=True))
        if fmt == "response":
            out.append({"prompt": r["prompt"], "response": r["response"], "reward": scores[r["response"]]})
            continue
        for better, worse in ranked_pairs(r, fmt):
            wins += scores[better] > scores[worse]
            pairs += 1
        key = "responses" if fmt == "ranking" else None
        out.append({"prompt": r["prompt"], **({key: [scores[x] for x in replies]} if key else
                                              {"chosen": scores[r["chosen"]], "rejected": scores[r["rejected"]]})})
    return {"records": out, "pairs": pairs, "accuracy": wins / pairs if pairs else None}


def judge(
    reward_model: nn.Module, rm_tokenizer: Any, prompts: Sequence[Prompt], replies: Sequence[str],
    baseline: Sequence[str], *, batch_size: int = 32,
) -> dict[str, float]:
    """Mean reward of `replies` and of `baseline` (replies of another model to the same prompts),
    and the win rate of `replies` over `baseline` (a tie counts half), by the reward model."""
    n = len(prompts)
    scores = rewards_of(reward_model, rm_tokenizer, list(zip([*prompts, *prompts], [*replies, *baseline], strict=True)),
                        batch_size=batch_size)
    mine, theirs = scores[:n], scores[n:]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, theirs, strict=True))
    return {"reward": sum(mine) / n, "reward_baseline": sum(theirs) / n, "win_rate": wins / n}
