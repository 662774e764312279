"""`model.keep_layers` (a smaller student from the model's own layers) and `tunelab score` (reward models)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests import tiny
from tunelab.cli import main
from tunelab.config import ModelConfig
from tunelab.errors import TunelabError
from tunelab.inference.reward import rewards_of
from tunelab.modeling.heads import is_reward_model
from tunelab.modeling.load import decoder_layers, keep_layers, load_model

IDS = torch.tensor([[5, 17, 42, 9, 88, 130, 7, 61]])


def layer_count(model) -> int:
    cfg = model.config
    return cfg.n_layer if cfg.model_type == "gpt2" else cfg.num_hidden_layers


def layer_indices(model) -> list[list[int]]:
    """The `layer_idx` of every module that has one, per decoder block."""
    return [sorted({m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")})
            for block in decoder_layers(model)]


def with_extra_layers(tmp: Path, arch: str, n: int) -> Path:
    """The tiny model of `arch` with `n` layers (the fixtures have 2)."""
    tok = tiny.tokenizer()
    torch.manual_seed(1)
    kw = {"n_layer": n} if arch == "gpt2" else {"num_hidden_layers": n}
    cfg = tiny.config(arch, len(tok))
    for k, v in kw.items():
        setattr(cfg, k, v)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[0]] * n
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    return tmp


# ----------------------------------------------------------------------------- keep_layers


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_keep_layers_keeps_the_same_blocks_renumbered_and_generates_with_a_cache(tmp_path, arch):
    d = with_extra_layers(tmp_path / arch, arch, 4)
    model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    blocks = list(decoder_layers(model))
    assert len(blocks) == 4 and layer_indices(model) == [[0], [1], [2], [3]]
    params = {i: [p.data_ptr() for p in b.parameters()] for i, b in enumerate(blocks)}
    keep = [1, 3]
    assert keep_layers(model, keep) is model  # in place
    kept = decoder_layers(model)
    assert len(kept) == 2 and all(kept[j] is blocks[i] for j, i in enumerate(keep))
    assert [[p.data_ptr() for p in b.parameters()] for b in kept] == [params[i] for i in keep]
    assert layer_count(model) == 2 == model.config.num_hidden_layers
    assert layer_indices(model) == [[0], [1]]
    if isinstance(getattr(model.config, "layer_types", None), list):
        assert len(model.config.layer_types) == 2
    # the same forward as a model built with 2 layers holding those weights
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = model(IDS, use_cache=False).logits
        torch.testing.assert_close(fresh(IDS, use_cache=False).logits, logits)
        # the KV cache is indexed by the renumbered layers: incremental decoding matches the full forward
        head = model(IDS[:, :5], use_cache=True)
        tail = model(IDS[:, 5:], past_key_values=head.past_key_values, use_cache=True).logits
        torch.testing.assert_close(tail, logits[:, 5:], rtol=1e-4, atol=1e-5)
        kw = {"attention_mask": torch.ones_like(IDS), "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        cached = model.generate(IDS, **kw)
        uncached = model.generate(IDS, use_cache=False, **kw)
    assert cached.shape == (1, IDS.shape[1] + 5) and torch.equal(cached, uncached)


def test_keep_layers_through_load_model_and_every_way_to_get_the_list_wrong(llama_dir):
    whole = load_model(ModelConfig(name_or_path=str(llama_dir)))
    one = load_model(ModelConfig(name_or_path=str(llama_dir), keep_layers=[1]))
    assert layer_count(one) == 1 and layer_indices(one) == [[0]]
    for (name, p), (name2, q) in zip(decoder_layers(one)[0].named_parameters(),
                                     decoder_layers(whole)[1].named_parameters(), strict=True):
        assert name == name2 and torch.equal(p, q)
    both = load_model(ModelConfig(name_or_path=str(llama_dir), keep_layers=[0, 1]))
    with torch.no_grad():  # keeping every layer changes nothing
        torch.testing.assert_close(both(IDS).logits, whole(IDS).logits)

    for bad in ([], [1, 0], [3, 1], [0, 2], [0, 0], [-1], [5]):
        model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
        with pytest.raises(TunelabError, match=re.escape(f"model.keep_layers {bad}")) as e:
            keep_layers(model, bad)
        assert "0..1" in e.value.message and e.value.fix
        assert len(decoder_layers(model)) == 2 and model.config.num_hidden_layers == 2  # untouched
    with pytest.raises(TunelabError, match="0..1"):
        load_model(ModelConfig(name_or_path=str(llama_dir), keep_layers=[2]))


def test_the_keep_layers_fix_suggests_a_list_that_works(llama_dir):
    model = keep_layers(AutoModelForCausalLM.from_pretrained(str(llama_dir)), [0])
    with pytest.raises(TunelabError) as e:
        keep_layers(model, [1])
    suggested = json.loads(re.search(r"model\.keep_layers=(\[[\d, ]*\])", e.value.fix).group(1))
    keep_layers(model, suggested)


def full_run(tmp_path: Path, llama_dir: Path, keep: list[int]) -> Path:
    train = tiny.write_jsonl(tmp_path / "chat.jsonl", tiny.chat_records(16, seed=1))
    run = tmp_path / "run"
    result = tunelab.train({
        "model": {"name_or_path": str(llama_dir), "keep_layers": keep},
        "data": {"train": str(train), "max_length": 64},
        "method": {"name": "full"},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "scheduler": "constant", "tensorboard": False,
                  "precision": "fp32"},
        "output": {"dir": str(run)},
    }, quiet=True)
    assert result.status == "completed" and result.steps == 2
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert json.loads((run / "final" / "config.json").read_text())["num_hidden_layers"] == 1
    return run


@pytest.mark.parametrize("keep", [[0], [1]])
def test_a_full_run_with_kept_layers_trains_and_reloads_with_those_layers(tmp_path, llama_dir, keep):
    run = full_run(tmp_path, llama_dir, keep)
    model, _ = tunelab.load(run)
    assert layer_count(model) == 1 and len(decoder_layers(model)) == 1 and layer_indices(model) == [[0]]
    original = decoder_layers(AutoModelForCausalLM.from_pretrained(str(llama_dir)))
    trained = dict(decoder_layers(model)[0].named_parameters())
    # 2 steps at lr 1e-4 move each weight by <= ~2e-4: the saved block is original layer `keep`, not the other
    for name, p in original[keep[0]].named_parameters():
        assert (trained[name] - p).abs().max() < 1e-3, name
    other = original[1 - keep[0]].self_attn.q_proj.weight
    assert (trained["self_attn.q_proj.weight"] - other).abs().max() > 1e-2
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


# ----------------------------------------------------------------------------- tunelab score


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def pref_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t, c = rng.choice(tiny.THINGS), rng.choice(tiny.COLOURS)
        out.append({"prompt": f"what colour is the {t}?", "chosen": f"{c} number", "rejected": c})
    return out


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("reward")
    train = tiny.write_jsonl(d / "train.jsonl", pref_records(16, seed=1))
    run = d / "run"
    result = tunelab.train({
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(train), "max_length": 64},
        "method": {"name": "head", "num_labels": 1},
        "objective": {"name": "reward"},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 3e-3, "tensorboard": False, "precision": "fp32"},
        "output": {"dir": str(run)},
    }, quiet=True)
    assert result.status == "completed"
    return run


MIXED = [
    {"prompt": "what colour is the lamp?", "response": "red"},
    {"prompt": "what colour is the seed?", "chosen": "teal number", "rejected": "teal"},
    {"prompt": "what colour is the road?", "responses": ["olive number", "olive", "coral and teal"]},
    {"prompt": [{"role": "user", "content": "what colour is the stone?"}], "response": "amber amber"},
    {"prompt": "what colour is the cloud?", "chosen": "blue", "rejected": "blue number"},
]


def replies_of(r: dict) -> list[str]:
    if "response" in r:
        return [r["response"]]
    return [r["chosen"], r["rejected"]] if "chosen" in r else list(r["responses"])


def test_score_prints_the_reward_models_rewards_per_record_and_pairwise_accuracy(reward_run, tmp_path, capsys):
    data = tiny.write_jsonl(tmp_path / "mixed.jsonl", MIXED)
    model, tok = tunelab.load(reward_run)
    assert is_reward_model(model)
    expected = [rewards_of(model, tok, [(r["prompt"], x) for x in replies_of(r)]) for r in MIXED]

    code, out, err = cli(capsys, "score", str(reward_run), "--data", str(data))
    assert code == 0, err
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert len(lines) == len(MIXED)
    for r, got, want in zip(MIXED, lines, expected, strict=True):
        assert got["prompt"] == r["prompt"]
        if "response" in r:
            assert set(got) == {"prompt", "response", "reward"} and got["response"] == r["response"]
            assert got["reward"] == pytest.approx(want[0], abs=1e-5)
        elif "chosen" in r:
            assert set(got) == {"prompt", "chosen", "rejected"}
            assert [got["chosen"], got["rejected"]] == pytest.approx(want, abs=1e-5)
        else:
            assert set(got) == {"prompt", "responses"} and got["responses"] == pytest.approx(want, abs=1e-5)
    wins = [want[0] > want[1] for r, want in zip(MIXED, expected, strict=True) if "chosen" in r]
    ranked = expected[2]
    wins += [ranked[i] > ranked[j] for i in range(3) for j in range(i + 1, 3)]
    assert len(wins) == 5
    assert f"pairwise accuracy {sum(wins) / 5:.3f} over 5 pairs" in err

    code, out, _ = cli(capsys, "score", str(reward_run), "--data", str(data), "--json", "--batch-size", "2")
    assert code == 0
    whole = json.loads(out)
    assert set(whole) == {"records", "pairs", "accuracy"}
    assert whole["pairs"] == 5 and whole["accuracy"] == pytest.approx(sum(wins) / 5)
    assert [r["prompt"] for r in whole["records"]] == [r["prompt"] for r in MIXED]
    assert whole["records"][2]["responses"] == pytest.approx(ranked, abs=1e-5)

    code, out, err = cli(capsys, "score", str(reward_run), "--data", str(data), "--limit", "1")
    assert code == 0 and len(out.strip().splitlines()) == 1 and "pairwise" not in err  # no pairs, no accuracy
    assert tunelab.api.score(reward_run, str(data), limit=1)["accuracy"] is None


def test_score_refuses_a_model_without_a_reward_head_and_names_bad_records(reward_run, llama_dir, tmp_path, capsys):
    data = tiny.write_jsonl(tmp_path / "ok.jsonl", MIXED[:2])
    code, out, err = cli(capsys, "score", str(llama_dir), "--data", str(data))
    assert code == 2 and out == ""
    assert "not a reward model" in err and "fix:" in err and "reward" in err.split("fix:", 1)[1]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(MIXED[0]), json.dumps(MIXED[1]), json.dumps({"prompt": "no reply"})]) + "\n")
    code, out, err = cli(capsys, "score", str(reward_run), "--data", str(bad))
    assert code == 2 and f"{bad}:3" in err and "not a scorable record" in err and "fix:" in err
    assert "Traceback" not in err

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(MIXED[0]) + "\n{not json\n")
    code, _, err = cli(capsys, "score", str(reward_run), "--data", str(broken))
    assert code == 2 and f"{broken}:2" in err and "Traceback" not in err
