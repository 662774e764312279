"""Packing and batches: bins are valid, and packed rows compute exactly what each example alone does."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as tf

from tunelab.data.collate import block_causal_mask, collate, pack, rows
from tunelab.data.types import IGNORE, Example

VOCAB = 97


def example(n: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
    labels = [IGNORE] * (n // 2) + ids[n // 2 :]  # a prompt half and a trained half
    return Example(ids, labels, f"f:{seed}")


@pytest.mark.parametrize("seed", range(5))
def test_pack_places_every_example_once_within_the_limit(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 300))]
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == pack(lengths, 64)  # deterministic
    lower_bound = -(-sum(lengths) // 64)
    assert len(bins) <= lower_bound * 1.25 + 1  # best-fit decreasing fills well


def test_pack_fills_exactly_when_it_can():
    assert pack([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert sorted(map(sorted, pack([7, 3, 6, 4, 10], 10))) == [[0, 1], [2, 3], [4]]


def test_pack_refuses_an_example_longer_than_a_bin():
    with pytest.raises(ValueError, match="longer than max_length"):
        pack([3, 11], 10)


def test_collate_packed_restarts_positions_and_masks_boundaries():
    a, b, c = example(4, 1), example(3, 2), example(5, 3)
    batch = collate([[a, b], [c]], pad_id=0, packed=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["input_ids"].tolist() == [a.input_ids + b.input_ids, c.input_ids + [0, 0]]
    want0 = [IGNORE] + a.labels[1:] + [IGNORE] + b.labels[1:]
    want1 = [IGNORE] + c.labels[1:] + [IGNORE, IGNORE]
    assert batch["labels"].tolist() == [want0, want1]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_unpacked_pads_right_with_an_attention_mask():
    a, c = example(4, 1), example(6, 3)
    batch = collate([[a], [c]], pad_id=0, packed=False)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["labels"][0, 4:].tolist() == [IGNORE, IGNORE]
    assert batch["labels"][:, 0].tolist() == [IGNORE, IGNORE]


def test_collate_refuses_several_examples_per_row_unpacked():
    with pytest.raises(ValueError, match="packed=True"):
        collate([[example(2, 1), example(2, 2)]], pad_id=0, packed=False)


def test_rows():
    exs = [example(n, i) for i, n in enumerate([6, 2, 5, 3])]
    assert rows(exs, 8, packing=False) == [[e] for e in exs]
    packed = rows(exs, 8, packing=True)
    assert sorted(e.where for r in packed for e in r) == sorted(e.where for e in exs)


def test_block_causal_mask_matches_the_runs():
    pos = torch.tensor([[0, 1, 0, 1, 2, 0]])
    allowed = block_causal_mask(pos, torch.float32)[0, 0] == 0
    seq = [0, 0, 1, 1, 1, 2]
    want = [[seq[i] == seq[j] and j <= i for j in range(6)] for i in range(6)]
    assert allowed.tolist() == want


# ----------------------------------------------------------------------------- no cross-contamination


def tiny_model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, attn_implementation=attn,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=1,
                            eos_token_id=2, attn_implementation=attn)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               vocab_size=VOCAB, max_position_embeddings=128, attn_implementation=attn)
        model = tf.GPTNeoXForCausalLM(cfg)
    assert model.config._attn_implementation == attn
    return model.eval()


PACKED_ROWS = [[example(9, 11), example(1, 12), example(14, 13), example(4, 14)], [example(6, 15)]]


@pytest.fixture(scope="module", params=[(a, m) for a in ("llama", "gpt2", "gpt_neox") for m in ("sdpa", "eager")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model_and_alone(request):
    model = tiny_model(*request.param)
    with torch.no_grad():
        alone = [[model(input_ids=torch.tensor([ex.input_ids])).logits[0] for ex in row] for row in PACKED_ROWS]
    return model, alone


def assert_rows_match(logits: torch.Tensor, alone: list[list[torch.Tensor]]) -> None:
    for b, row in enumerate(alone):
        t = 0
        for ref in row:
            n = ref.shape[0]
            torch.testing.assert_close(logits[b, t : t + n], ref, atol=1e-5, rtol=0)
            t += n


def test_packed_row_equals_each_example_alone(model_and_alone):
    model, alone = model_and_alone
    batch = collate(PACKED_ROWS, pad_id=0, packed=True)
    with torch.no_grad():
        # transformers reads packing from position_ids only when no KV cache is built
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    assert_rows_match(logits, alone)


def test_packed_row_with_a_4d_mask_equals_each_example_alone(model_and_alone):
    model, alone = model_and_alone
    batch = collate(PACKED_ROWS, pad_id=0, packed=True, block_mask=torch.float32)
    assert batch["attention_mask"].shape == (2, 1, 28, 28)
    with torch.no_grad():
        # the explicit mask holds even with the config's default use_cache
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert_rows_match(logits, alone)


def test_unpacked_padded_batch_equals_each_example_alone(model_and_alone):
    model, alone = model_and_alone
    single = [[ex] for row in PACKED_ROWS for ex in row]
    refs = [[ref] for row in alone for ref in row]
    batch = collate(single, pad_id=0, packed=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_rows_match(logits, refs)
