"""Task metrics: exact match and answer accuracy of generated replies, cloze accuracy, classification
and preference accuracy by log-likelihood, perplexity.

A file's kind follows from its records' keys (`record_kind`):

- generative: `messages` / `conversations` / `instruction` records (+ optional short gold `answer`;
  else the last assistant turn is the gold). The prompt is the chat without its last assistant
  turn, answered greedily through the chat template. Metrics: exact_match, accuracy (below), and
  loss/perplexity of the gold assistant turn (the data pipeline's masking).
- cloze: `prompt` + `answer`, raw text, no chat template; the answer follows after one space.
  accuracy: the continuation's first len(answer.split()) words, normalized, equal the normalized
  answer. exact_match: the whole continuation (to the stop token) equals the answer.
- classification: `text` + `label`. Each label is scored as the continuation `" " + label` of
  `CLASSIFICATION_PROMPT`; the label with the highest summed log-likelihood is the prediction.
- preference: `prompt` + `chosen` + `rejected`, or `prompt` + `responses` (best first). accuracy:
  the share of (better, worse) pairs where the better response has the higher mean per-token
  log-likelihood after the chat prompt (mean, not sum: summed log-likelihood mostly rewards brevity).
- text: `text`; loss and perplexity of every token.

Exact match: `normalize(pred) == normalize(gold)`. Accuracy (lenient): the normalized gold occurs
in the normalized prediction as whole words (not inside a longer word), e.g. gold "Recife" is
accurate for "She lives in Recife." but not for "Recifeland". Rates are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tunelab.artifacts import load
from tunelab.data.pipeline import render_example
from tunelab.data.qa import contains_answer, exact_match, normalize, prompt_and_gold
from tunelab.data.templates import tokenize_text
from tunelab.data.types import IGNORE, Example
from tunelab.errors import DataError, TunelabError
from tunelab.eval.classify import evaluate_head
from tunelab.inference.generation import Prompt, continuation_logprobs, greedy, pad_id
from tunelab.inference.loss import evaluate_loss
from tunelab.inference.reward import score_fn
from tunelab.modeling.heads import is_classifier, is_reward_model
from tunelab.world import SPLITS, is_tinyworld

KINDS = ("generative", "cloze", "classification", "preference", "text")
# Context of a classification record; each candidate label is scored as its continuation " <label>".
CLASSIFICATION_PROMPT = "{text}\nSentiment:"
MAX_NEW_TOKENS = 16
PROBE = "tinyworld:probe"  # the whole forgetting probe (facts cloze + held-out perplexity)

GenerateFn = Callable[[list[Prompt], bool], list[str]]  # (prompts, chat) -> replies
ScoreFn = Callable[[list[Prompt], list[str], bool], list[tuple[float, int]]]  # -> (sum log p, tokens)


# ----------------------------------------------------------------------------- string metrics


def cloze_correct(continuation: str, answer: str) -> bool:
    """The continuation's first len(answer.split()) words, normalized, equal the normalized answer."""
    k = len(str(answer).split())
    return normalize(" ".join(continuation.split()[:k])) == normalize(answer)


# ----------------------------------------------------------------------------- kinds


def record_kind(record: dict[str, Any]) -> str | None:
    keys = set(record)
    if "prompt" in keys and ({"chosen", "rejected"} <= keys or "responses" in keys):
        return "preference"
    if keys & {"messages", "conversations", "instruction"}:
        return "generative"
    if {"prompt", "answer"} <= keys:
        return "cloze"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def infer_kind(records: Sequence[dict[str, Any]], where: str = "records") -> str:
    kinds = {record_kind(r) for r in records}
    if None in kinds or len(kinds) != 1:
        raise DataError(
            f"{where}: cannot tell what to evaluate (record kinds found: {sorted(map(str, kinds))})",
            fix="give every record the keys of one kind: messages(+answer), prompt+answer, text+label, "
            "prompt+chosen+rejected, or text",
        )
    return kinds.pop()  # type: ignore[return-value]


# ----------------------------------------------------------------------------- evaluation


def evaluate_records(
    model: nn.Module | None, tokenizer: Any, records: Sequence[dict[str, Any]], *, kind: str | None = None,
    batch_size: int = 32, generate: GenerateFn | None = None, score: ScoreFn | None = None, with_loss: bool = True,
    labels: Sequence[str] | None = None, max_length: int = 1024,
) -> dict[str, Any]:
    """Metrics of `records` (all of one kind; inferred when `kind` is None).

    `generate` / `score` replace greedy generation / continuation scoring (tests pass stubs);
    `labels`: the classification label set (default: the labels present); `with_loss`: also the
    gold reply's loss for generative records."""
    kind = kind or infer_kind(records)
    if kind not in KINDS:
        raise TunelabError(f"unknown evaluation kind {kind!r}; known: {', '.join(KINDS)}")
    if not records:
        raise DataError("nothing to evaluate: no records")
    if generate is None:
        def generate(prompts: list[Prompt], chat: bool) -> list[str]:
            return greedy(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, chat=chat)
    if score is None:
        def score(contexts: list[Prompt], continuations: list[str], chat: bool) -> list[tuple[float, int]]:
            return continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=batch_size, chat=chat)
    max_length = min(max_length, getattr(getattr(model, "config", None), "max_position_embeddings", max_length))
    if kind == "generative":
        out = _generative(records, generate)
        if with_loss:
            examples = [_chat_example(r, tokenizer, max_length) for r in records]
            out.update(_loss(model, tokenizer, [e for e in examples if e is not None], batch_size, max_length))
        return out
    if kind == "cloze":
        return _cloze(records, generate)
    if kind == "classification":
        if is_classifier(model):  # a head (methods/heads.py): accuracy of its argmax, not label log-likelihood
            return evaluate_head(model, tokenizer, records, labels, batch_size=batch_size, max_length=max_length)
        return _classification(records, score, labels)
    if kind == "preference":
        if is_reward_model(model):  # a scalar reward head scores the replies (objective reward)
            return {**_preference(records, score_fn(model, tokenizer, batch_size)), "scored_by": "reward head"}
        return _preference(records, score)
    examples = [Example(*_truncate(tokenize_text(tokenizer, r["text"]), max_length)) for r in records]
    return {"kind": "text", "n": len(records), **_loss(model, tokenizer, examples, batch_size, max_length)}


def _generative(records: Sequence[dict[str, Any]], generate: GenerateFn) -> dict[str, Any]:
    prompts, golds = zip(*[prompt_and_gold(r)[:2] for r in records], strict=True)
    preds = generate(list(prompts), True)
    n = len(records)
    return {
        "kind": "generative", "n": n,
        "exact_match": sum(map(exact_match, preds, golds)) / n,
        "accuracy": sum(map(contains_answer, preds, golds)) / n,
    }


def _cloze(records: Sequence[dict[str, Any]], generate: GenerateFn) -> dict[str, Any]:
    answers = [str(r["answer"]) for r in records]
    conts = generate([r["prompt"] for r in records], False)
    n = len(records)
    return {
        "kind": "cloze", "n": n,
        "accuracy": sum(map(cloze_correct, conts, answers)) / n,
        "exact_match": sum(map(exact_match, conts, answers)) / n,
    }


def _classification(
    records: Sequence[dict[str, Any]], score: ScoreFn, labels: Sequence[str] | None
) -> dict[str, Any]:
    labels = [str(x) for x in labels] if labels else sorted({str(r["label"]) for r in records})
    contexts = [CLASSIFICATION_PROMPT.format(text=r["text"]) for r in records for _ in labels]
    scores = score(contexts, [" " + label for _ in records for label in labels], False)
    per_class = {label: {"n": 0, "correct": 0, "predicted": 0} for label in labels}
    correct = 0
    for i, r in enumerate(records):
        row = [s for s, _ in scores[i * len(labels) : (i + 1) * len(labels)]]
        pred, gold = labels[row.index(max(row))], str(r["label"])
        per_class[pred]["predicted"] += 1
        per_class.setdefault(gold, {"n": 0, "correct": 0, "predicted": 0})["n"] += 1
        per_class[gold]["correct"] += pred == gold
        correct += pred == gold
    return {"kind": "classification", "n": len(records), "accuracy": correct / len(records), "per_class": per_class}


def _preference(records: Sequence[dict[str, Any]], score: ScoreFn) -> dict[str, Any]:
    contexts: list[Prompt] = []
    conts: list[str] = []
    for r in records:
        ranked = list(r["responses"]) if "responses" in r else [r["chosen"], r["rejected"]]
        for better, worse in ((a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :]):
            contexts += [r["prompt"], r["prompt"]]
            conts += [str(better), str(worse)]
    scores = [s / max(n, 1) for s, n in score(contexts, conts, True)]
    wins = sum(scores[i] > scores[i + 1] for i in range(0, len(scores), 2))
    pairs = len(scores) // 2
    return {"kind": "preference", "n": len(records), "pairs": pairs, "accuracy": wins / max(pairs, 1)}


def _truncate(ids_labels: tuple[list[int], list[int]], max_length: int) -> tuple[list[int], list[int]]:
    ids, labels = ids_labels
    return ids[:max_length], labels[:max_length]


def _chat_example(record: dict[str, Any], tokenizer: Any, max_length: int) -> Example | None:
    prompt, _, reply = prompt_and_gold(record)
    chat = {"messages": [*prompt, {"role": "assistant", "content": reply}]}
    ids, labels = _truncate(
        render_example(chat, "chat", tokenizer, mask_prompt=True, chat_template=None), max_length
    )
    return Example(ids, labels) if any(x != IGNORE for x in labels) else None


def _loss(
    model: nn.Module | None, tokenizer: Any, examples: list[Example], batch_size: int, max_length: int
) -> dict[str, float]:
    if model is None or not examples:
        return {}
    return evaluate_loss(model, examples, batch_size=batch_size, pad_id=pad_id(tokenizer),
                         packing=False, max_length=max_length)


# ----------------------------------------------------------------------------- task specs


def known_tasks() -> list[str]:
    return [f"tinyworld:{t}" for t in SPLITS]


def _unknown(spec: str, why: str) -> TunelabError:
    return TunelabError(
        f"unknown task {spec!r} ({why}); known tasks: {', '.join(known_tasks())} (add @<split>), or a dataset file",
        fix="write tinyworld:<task>[@<split>] (e.g. tinyworld:qa@test, tinyworld:probe), or a .jsonl/.json/.csv/"
        ".parquet path",
    )


def parse_spec(spec: str) -> tuple[str, str] | None:
    """(task, split) of a TinyWorld spec, None for a file; raises for anything unknown. Without a
    split a task means its test split (its first where it has none)."""
    if not is_tinyworld(spec):
        if not Path(spec).exists():
            raise _unknown(spec, "not a TinyWorld task and no such file")
        return None
    task, _, split = spec.partition(":")[2].partition("@")
    if task not in SPLITS:
        raise _unknown(spec, f"no TinyWorld task {task!r}")
    if task == "probe" and not split:
        return task, ""
    split = split or ("test" if "test" in SPLITS[task] else SPLITS[task][0])
    if split not in SPLITS[task]:
        raise _unknown(spec, f"task {task!r} has splits {', '.join(SPLITS[task])}")
    return task, split


def load_model_or_run(
    model_or_run: str | Path | tuple[nn.Module, Any], *, trust_remote_code: bool = False, allow_pickle: bool = False,
) -> tuple[nn.Module, Any]:
    """A (model, tokenizer) pair as is; anything else goes through `artifacts.load` (the trust flags
    are the current command's: artifacts.untrusted)."""
    if isinstance(model_or_run, tuple):
        return model_or_run
    return load(model_or_run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)



# ----------------------------------------------------------------------------- display

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def results_table(results: dict[str, dict[str, Any]]) -> Any:
    """A rich Table: one row per (task, metric)."""
    from rich.table import Table

    table = Table()
    table.add_column("task", overflow="fold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for task, metrics in results.items():
        for i, (name, value) in enumerate(flatten(metrics).items()):
            if name.endswith("tokens") and isinstance(value, float) and value.is_integer():
                value = int(value)
            shown = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
            table.add_row(task if i == 0 else "", name, shown)
    return table
