"""Classification tasks scored by a classification head (methods head / features): accuracy and
per-class counts of the head's argmax."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.data.classify import encode_texts, sort_labels
from tunelab.errors import TunelabError
from tunelab.inference.generation import pad_id
from tunelab.modeling.heads import ClassifierModel, predict


def evaluate_head(
    model: ClassifierModel, tokenizer: Any, records: Sequence[dict[str, Any]], labels: Sequence[str] | None, *,
    batch_size: int = 32, max_length: int = 1024,
) -> dict[str, Any]:
    """Accuracy and per-class counts of the head's argmax on `{"text", "label"}` records.

    Output i means `model.label_names[i]`, else the i-th of `labels` (the task's labels) in the
    order training gives ids (data/classify.py `sort_labels`)."""

    names = model.label_names or sort_labels(str(x) for x in (labels or [r["label"] for r in records]))
    n_out = model.head.out_features
    if len(names) != n_out:
        raise TunelabError(f"the head has {n_out} outputs but the task has {len(names)} labels {names}",
                           fix="evaluate on the task the head was trained on, or train with method.labels set")
    examples = encode_texts(tokenizer, [r["text"] for r in records], max_length)
    preds = [names[i] for i in predict(model, examples, pad_id=pad_id(tokenizer), batch_size=batch_size)]
    per_class = {name: {"n": 0, "correct": 0, "predicted": 0} for name in names}
    for pred, record in zip(preds, records, strict=True):
        gold = str(record["label"])
        per_class[pred]["predicted"] += 1
        per_class.setdefault(gold, {"n": 0, "correct": 0, "predicted": 0})["n"] += 1
        per_class[gold]["correct"] += pred == gold
    correct = sum(c["correct"] for c in per_class.values())
    return {"kind": "classification", "n": len(records), "accuracy": correct / len(records), "per_class": per_class,
            "scored_by": "head"}
