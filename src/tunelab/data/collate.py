"""Packing examples into rows and rows into batches.

Packed rows hold several examples back to back. They must not see each other: `position_ids`
restart at 0 at every example and no `attention_mask` is returned, from which transformers (>=5)
builds a block-diagonal causal mask. That detection only runs when the forward gets no KV cache:
call the model with `use_cache=False` (most configs default to True, and then every example in
a row attends to the ones before it, silently). Models that do not read packing from
`position_ids` can get an explicit 4D mask instead: `collate(..., block_mask=dtype)`.

Labels are unshifted (the loss shifts) and IGNORE on the first token of every example, so no
position is trained to predict across an example boundary, and on padding.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import replace

import torch

from tunelab.data.types import IGNORE, Example


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bins of example indices, each summing to <= max_length: best-fit decreasing, deterministic.

    Every example lands in exactly one bin and is never split; indices in a bin are ascending.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) longer than max_length {max_length}, e.g. index {too_long[0]}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), ascending: the best fit is the first that fits
    smallest = min(lengths, default=0)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            room, b = max_length - n, len(bins) - 1
        else:
            room, b = free.pop(pos)
            bins[b].append(i)
            room -= n
        if room >= smallest:  # bins no example fits are closed, keeping `free` short
            bisect.insort(free, (room, b))
    return [sorted(b) for b in bins]


def rows(examples: Sequence[Example], max_length: int, packing: bool) -> list[list[Example]]:
    """Rows for `collate`: packed bins when `packing`, else one example per row, in order."""
    if not packing:
        return [[ex] for ex in examples]
    return [[examples[i] for i in b] for b in pack([len(ex.input_ids) for ex in examples], max_length)]


def collate(
    rows: Sequence[Sequence[Example]], pad_id: int, packed: bool, *, block_mask: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A right-padded batch of rows, each row one or more examples concatenated in order.

    Returns `input_ids`, `labels` (B, T) and, if `packed`, `position_ids` (B, T) and no
    attention_mask (see the module docstring); else `attention_mask` (B, T), 0 on padding.
    `block_mask=dtype` (packed only) adds an additive (B, 1, T, T) block-diagonal causal
    `attention_mask` of that dtype, for models that ignore packed `position_ids`.
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row, and no empty row")
    if any(ex.rejected is not None for row in rows for ex in row):
        return _collate_pairs(rows, pad_id)
    if not packed and any(len(row) > 1 for row in rows):
        raise ValueError("several examples in one row need packed=True, or they would attend to each other")
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T)
    pos = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    lengths = []
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex.input_ids)
            ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t + 1 : t + n] = torch.tensor(ex.labels[1:], dtype=torch.long)
            pos[b, t : t + n] = torch.arange(n)
            t += n
        pos[b, t:] = torch.arange(width - t)  # padding is a run of its own
        lengths.append(t)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = pos
        if block_mask is not None:
            batch["attention_mask"] = block_causal_mask(pos, block_mask)
    else:
        batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    # --- classification (data/classify.py): one class id per row, `label` (B,)
    if any(ex.label is not None for row in rows for ex in row):
        if packed or any(ex.label is None for row in rows for ex in row):
            raise ValueError("classification examples need packed=False and a label on every example")
        batch["label"] = torch.tensor([row[0].label for row in rows], dtype=torch.long)  # (B,)
    # ---
    return batch


def _collate_pairs(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference pairs (data/preference.py), one per row: the B chosen conversations, then the B
    rejected ones, in one (2B, T) batch (one forward pass scores both), and `n_pairs` = B, the
    number of trained units the loop normalises by."""
    if any(len(row) != 1 or row[0].rejected is None for row in rows):
        raise ValueError("preference pairs need packed=False and a rejected reply on every example")
    pairs = [row[0] for row in rows]
    rows_2b = [[replace(ex, rejected=None)] for ex in pairs] + [[ex.rejected] for ex in pairs]
    batch = collate(rows_2b, pad_id, packed=False)
    batch["n_pairs"] = torch.tensor(len(pairs))
    return batch


def document_index(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) the number of the example each token of a packed row belongs to: examples are the runs of
    `position_ids` that count up by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: 0 where query i may see key j (same example, j <= i), else the
    dtype's minimum. Examples are the runs of `position_ids` that count up by one."""
    seq = document_index(position_ids)  # (B, T) example number of each token
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()  # (T, T)
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)
