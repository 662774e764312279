"""M19 LST: the side network against a naive reference computed by hand from its weights; no gradient
reaches the backbone (it runs under no_grad, even with its parameters unfrozen); cached generation equals
recomputing the whole sequence; packed documents stay apart in the side network; trains and reloads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tunelab
from tests.test_train_loop import run_cfg
from tunelab.errors import TunelabError
from tunelab.methods import METHODS
from tunelab.modeling.load import decoder_layers
from tunelab.runconfig import method_config


def base_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()


def lst(llama_dir, **kw):
    torch.manual_seed(0)
    model = METHODS["lst"].apply(base_model(llama_dir), method_config({"name": "lst", **kw})).eval()
    with torch.no_grad():  # non-zero everywhere, so every part of the formula shows in the output
        for p in model.tunelab_lst.parameters():
            p.normal_(0, 0.3)
    return model


def backbone_states(base, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """h_0 (the first layer's input), h_1..h_N (each layer's output) and the last hidden state, of the plain base."""
    feeds: list[torch.Tensor] = []
    layers = decoder_layers(base)
    hooks = [layers[0].register_forward_pre_hook(lambda m, a, kw: feeds.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, a, o: feeds.append(o[0] if isinstance(o, tuple) else o))
              for layer in layers]
    with torch.no_grad():
        last = base.base_model(input_ids=ids).last_hidden_state
    for h in hooks:
        h.remove()
    return feeds, last


def naive_block(blk, x: torch.Tensor) -> torch.Tensor:
    b, t, w = x.shape
    nh, hd = blk.heads, w // blk.heads
    y = F.layer_norm(x, (w,), blk.ln1.weight, blk.ln1.bias)
    q, k, v = (y @ blk.qkv.weight.T + blk.qkv.bias).split(w, dim=-1)
    out = torch.zeros_like(x)
    for head in range(nh):
        sl = slice(head * hd, (head + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    x = x + out @ blk.proj.weight.T + blk.proj.bias
    y = F.layer_norm(x, (w,), blk.ln2.weight, blk.ln2.bias)
    return x + F.gelu(y @ blk.fc.weight.T + blk.fc.bias) @ blk.out.weight.T + blk.out.bias


def test_the_output_is_the_side_network_computed_by_hand(llama_dir):
    model = lst(llama_dir, reduction=4, heads=2)
    side, base = model.tunelab_lst, base_model(llama_dir)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    feeds, last = backbone_states(base, ids)
    with torch.no_grad():
        lin = lambda m, x: x @ m.weight.T + m.bias  # noqa: E731
        s = lin(side.ladders[0], feeds[0])
        for i, blk in enumerate(side.blocks):
            mu = 1 / (1 + math.exp(-float(side.alpha[i]) / 0.1))
            s = naive_block(blk, mu * lin(side.ladders[i + 1], feeds[i + 1]) + (1 - mu) * s)
        s = F.layer_norm(s, (s.shape[-1],), side.ln_f.weight, side.ln_f.bias)
        want = base.lm_head(last + lin(side.up, s))
        got = model(input_ids=ids).logits
    assert len(feeds) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_gradient_reaches_the_backbone_even_unfrozen(llama_dir):
    model = lst(llama_dir)
    body = model.base_model
    body.requires_grad_(True)  # the backbone runs under no_grad: not even unfrozen weights get a gradient
    model.train()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).logits.square().mean().backward()
    assert [n for n, p in body.named_parameters() if p.grad is not None] == []
    side = dict(model.tunelab_lst.named_parameters())
    assert all(side[n].grad is not None for n in side) and float(side["up.weight"].grad.abs().sum()) > 0


def test_cached_generation_equals_recomputing_the_whole_sequence(llama_dir):
    model = lst(llama_dir)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):  # no cache: the whole sequence each step
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_packed_documents_do_not_see_each_other(llama_dir):
    model = lst(llama_dir)
    a = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    b = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        got = model(input_ids=packed, position_ids=pos, use_cache=False).logits  # as packed batches come
        alone = [model(input_ids=x, use_cache=False).logits for x in (a, b)]
    torch.testing.assert_close(got, torch.cat(alone, dim=1), rtol=1e-4, atol=1e-4)


def test_a_side_width_that_does_not_fit_is_one_clear_error(llama_dir):
    with pytest.raises(TunelabError, match="not divisible by 3 heads"):
        lst(llama_dir, reduction=4, heads=3)


def test_trains_through_the_loop_and_reloads(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "run", max_steps=4, lr=1e-2)
    cfg["method"] = {"name": "lst", "reduction": 4}
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed"
    loaded, _ = tunelab.load(tmp_path / "run")
    assert float(loaded.tunelab_lst.up.weight.abs().sum()) > 0  # the up-projection trained and came back
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert not torch.allclose(loaded.eval()(input_ids=ids).logits, base_model(llama_dir)(input_ids=ids).logits)
