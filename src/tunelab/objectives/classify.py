"""Classification objective `classify`: cross-entropy of a classification head's logits.

    loss = sum_i -log softmax(z_i)[y_i],   z_i = head(pool(body(x_i))) in R^C,  y_i in {0..C-1}

summed over the examples of the micro-batch; the loop divides by the examples of the whole
accumulated batch (each classification example counts as one trained position, see
data/classify.py), so accumulation never changes the update. Rows labelled IGNORE add nothing.

Needs a model whose output `.logits` is (B, C): the `head` (M03) and `features` (M04) methods.
Data: `{"text", "label"}` records; class ids are positions in `labels` (below), else in the sorted
labels of the training file.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunelab.config import ObjectiveConfig
from tunelab.data.classify import sort_labels
from tunelab.data.types import IGNORE
from tunelab.errors import ConfigError, TunelabError
from tunelab.objectives.registry import register_objective


class ClassifyConfig(ObjectiveConfig):
    name: Literal["classify"] = "classify"
    labels: list[str] | None = Field(
        None, description="the label order (class id = position); default: the sorted labels of data.train"
    )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and the number of labelled rows.

    logits (B, C), labels (B,) class ids, IGNORE for a row without a label. An empty or fully
    unlabelled batch gives (0, 0) with a gradient path, never NaN."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return loss_sum, (labels != IGNORE).sum()


def classify_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: ClassifyConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits  # (B, C)
    if logits.dim() != 2:
        raise TunelabError(
            f"objective classify needs a classification head (logits (batch, classes)), got logits of shape "
            f"{tuple(logits.shape)}", fix="use method.name=head or method.name=features",
        )
    if "label" not in batch:
        raise TunelabError("objective classify needs classification data ({\"text\", \"label\"} records)",
                           fix="set data.format=classification")
    labels = batch["label"]  # (B,)
    _check_labels(model, labels, logits.size(1), cfg)
    return classification_loss(logits, labels)


def _check_labels(model: nn.Module, labels: torch.Tensor, n_out: int, cfg: ClassifyConfig) -> None:
    names = getattr(model, "label_names", None)
    if names and cfg.labels and list(names) != list(cfg.labels):
        raise ConfigError(f"method.labels {list(names)} and objective.labels {list(cfg.labels)} differ",
                          fix="give one order in both (the head's output i is class i)")
    if names and not cfg.labels and list(names) != sort_labels(names):
        raise ConfigError(f"method.labels {list(names)} are not sorted, but without objective.labels the class ids "
                          f"follow the sorted training labels {sort_labels(names)}",
                          fix="list method.labels sorted, or give the same list as objective.labels")
    top = int(labels.max()) if labels.numel() else -1
    if top >= n_out:
        raise ConfigError(f"the data has at least {top + 1} classes but the head has {n_out} outputs",
                          fix=f"set method.num_labels={top + 1} (or list the classes in method.labels)")


register_objective(
    "classify", ClassifyConfig, formats=("classification",), mask_prompt=False,
    summary="classification: cross-entropy of a classification head's logits (methods head, features)",
)(classify_loss)
