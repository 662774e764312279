"""M03 head replacement, M04 feature extraction, objective `classify` and the classification data path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tunelab
from tests import tiny
from tunelab.artifacts import save_artifact
from tunelab.config import DataConfig, ModelConfig
from tunelab.data.collate import collate
from tunelab.data.pipeline import load_tokenized
from tunelab.data.stream import BatchStream
from tunelab.data.types import IGNORE, Example
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.eval.suite import evaluate_task
from tunelab.methods import METHODS, count_parameters
from tunelab.methods.heads import FeaturesConfig, HeadConfig
from tunelab.modeling.heads import ClassifierModel, pool_hidden
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.classify import ClassifyConfig, classification_loss
from tunelab.runconfig import build_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GOOD = ["good", "great", "lovely", "fine"]
BAD = ["bad", "awful", "poor", "ugly"]


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """Two obviously separable classes: the adjective says it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        adj = rng.choice(GOOD if positive else BAD)
        label = "positive" if positive else "negative"
        out.append({"text": f"The {rng.choice(tiny.THINGS)} was {adj}.", "label": label})
    return out


def fresh(llama_dir: Path, method: str, seed: int = 0, **kw) -> ClassifierModel:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    return METHODS[method].apply(base, METHODS[method].config_cls(name=method, **kw))


def batch_of(tok, texts: list[str], labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    exs = []
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        exs.append(Example(ids, [IGNORE] * len(ids), label=None if labels is None else labels[i]))
    return collate([[ex] for ex in exs], pad_id=tok.pad_token_id, packed=False)


# ----------------------------------------------------------------------------- the loss


def naive_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    total, n = logits.new_zeros(()), 0
    for z, y in zip(logits, labels, strict=True):
        if int(y) == IGNORE:
            continue
        total = total - torch.log(torch.exp(z[y]) / torch.exp(z).sum())
        n += 1
    return total, n


def test_classification_loss_matches_naive_reference_and_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, IGNORE, 2, 0])
    got, n = classification_loss(logits, labels)
    ref, n_ref = naive_loss(logits, labels)
    assert int(n) == n_ref == 5
    torch.testing.assert_close(got, ref)
    g_got, = torch.autograd.grad(got, logits)
    g_ref, = torch.autograd.grad(naive_loss(logits, labels)[0], logits)
    torch.testing.assert_close(g_got, g_ref)
    # d/dz = softmax(z) - onehot(y) on labelled rows, 0 on the IGNORE row
    onehot = torch.zeros(6, 3, dtype=torch.float64)
    keep = labels != IGNORE
    onehot[keep] = torch.nn.functional.one_hot(labels[keep], 3).double()
    torch.testing.assert_close(g_got, (torch.softmax(logits, -1) - onehot) * keep[:, None])
    assert torch.autograd.gradcheck(lambda z: classification_loss(z, labels)[0], (logits.detach().requires_grad_(),))


@pytest.mark.parametrize("labels", [torch.empty(0, dtype=torch.long), torch.full((3,), IGNORE)])
def test_empty_or_unlabelled_batch_gives_zero_not_nan(labels):
    logits = torch.randn(len(labels), 4, requires_grad=True)
    loss, n = classification_loss(logits, labels)
    assert float(loss.detach()) == 0.0 and int(n) == 0
    (loss / max(int(n), 1)).backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- pooling


def test_last_pooling_picks_the_last_real_token_of_a_right_padded_batch(llama_dir, tok):
    model = fresh(llama_dir, "head").eval()
    texts = ["The lamp was good.", "A stone.", "The river is blue and the number is 7."]
    batch = batch_of(tok, texts)
    lengths = [len(tok(t)["input_ids"]) + 1 for t in texts]
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]
    with torch.no_grad():
        hidden = model.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        by_hand = torch.stack([hidden[b, n - 1] for b, n in enumerate(lengths)])  # (B, H)
        torch.testing.assert_close(pool_hidden(hidden, batch["attention_mask"], "last"), by_hand, rtol=0, atol=0)
        logits = model(batch["input_ids"], batch["attention_mask"]).logits
        torch.testing.assert_close(logits, model.head(by_hand))
        for b, text in enumerate(texts):  # padding changes nothing: each row alone gives the same logits
            alone = batch_of(tok, [text])
            torch.testing.assert_close(model(alone["input_ids"], alone["attention_mask"]).logits[0], logits[b],
                                       rtol=1e-5, atol=1e-5)


def test_mean_pooling_averages_the_real_tokens_only():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    by_hand = torch.stack([hidden[0].mean(0), (hidden[1, 0] + hidden[1, 1]) / 2, hidden[2, 0]])
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean"), by_hand)
    # left padding: `last` still finds the last real token
    left = torch.tensor([[0, 0, 1, 1, 1]] * 3)
    torch.testing.assert_close(pool_hidden(hidden, left, "last"), hidden[:, 4])


# ----------------------------------------------------------------------------- what trains


def one_step(model: ClassifierModel, tok) -> None:
    batch = batch_of(tok, ["The lamp was good.", "The road was awful.", "A lovely seed."], [1, 0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss, n = OBJECTIVES["classify"].loss(model, batch, ClassifyConfig())
    (loss / n).backward()
    opt.step()


@pytest.mark.parametrize("method", ["features", "head"])
def test_only_the_head_trains_for_features_and_everything_for_head(llama_dir, tok, method):
    model = fresh(llama_dir, method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model, tok)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"head.weight", "head.bias"} <= changed
    body = {n for n in before if n.startswith("body.")}
    if method == "features":
        assert not changed & body  # bit-identical body
        assert not model.body.training  # a frozen extractor stays in eval mode
        trainable, _ = count_parameters(model)
        assert trainable == model.head.weight.numel() + model.head.bias.numel()
    else:
        assert body - changed <= {"body.embed_tokens.weight"} and len(changed & body) > 10


def test_configs_validate_num_labels_and_names():
    assert HeadConfig(labels=["a", "b", "c"]).num_labels == 3
    assert FeaturesConfig().body == "frozen" and HeadConfig().num_labels == 2
    with pytest.raises(ValueError, match="num_labels=2 but 3"):
        HeadConfig(num_labels=2, labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match="method.body"):
        build_config({"method": {"name": "features", "body": "full"}})


def test_classify_refuses_a_model_without_a_head(llama_dir, tok):
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    with pytest.raises(TunelabError, match="needs a classification head"):
        OBJECTIVES["classify"].loss(base, batch_of(tok, ["x y"], [0]), ClassifyConfig())
    model = fresh(llama_dir, "head")
    with pytest.raises(ConfigError, match="num_labels=3"):
        OBJECTIVES["classify"].loss(model, batch_of(tok, ["x y", "z"], [0, 2]), ClassifyConfig())
    named = fresh(llama_dir, "head", labels=["positive", "negative"])
    with pytest.raises(ConfigError, match="not sorted"):
        OBJECTIVES["classify"].loss(named, batch_of(tok, ["x y"], [0]), ClassifyConfig())
    with pytest.raises(ConfigError, match="differ"):
        OBJECTIVES["classify"].loss(named, batch_of(tok, ["x y"], [0]), ClassifyConfig(labels=["negative", "positive"]))
    OBJECTIVES["classify"].loss(named, batch_of(tok, ["x y"], [0]), ClassifyConfig(labels=["positive", "negative"]))


# ----------------------------------------------------------------------------- data


def test_classification_data_label_ids_eval_split_and_loop_count(tmp_path, tok):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", sentiment_records(10) + [{"text": "meh.", "label": "neutral"}])
    evals = tiny.write_jsonl(tmp_path / "eval.jsonl", [{"text": "A good lamp.", "label": "positive"},
                                                       {"text": "So so.", "label": "mixed"}])
    cfg = DataConfig(train=str(train), eval=str(evals), on_error="skip", max_bad_fraction=0.6)
    kw = {"mask_prompt": False, "formats": ("classification",), "log": lambda s: None}
    data = load_tokenized(cfg, "train", tok, **kw)
    assert data.stats["labels"] == ["negative", "neutral", "positive"]  # sorted training labels
    ex = data.examples[0]
    assert ex.label == 2 and ex.input_ids[-1] == tok.eos_token_id
    assert [i for i, x in enumerate(ex.labels) if x != IGNORE] == [1] and ex.labels[1] == ex.label
    ev = load_tokenized(cfg, "eval", tok, **kw)  # ids from the *training* labels; unknown label is bad
    assert [e.label for e in ev.examples] == [2] and ev.stats["n_bad"] == 1
    explicit = load_tokenized(cfg, "train", tok, **kw, labels=["positive", "negative", "neutral"])
    assert explicit.examples[0].label == 0 and explicit.fingerprint != data.fingerprint
    short = load_tokenized(cfg.model_copy(update={"max_length": 3}), "train", tok, **kw)
    assert [e.label for e in short.examples] == [e.label for e in data.examples]  # truncation keeps the class
    # collate carries `label` (B,); the loop's token count gives one per example without any change
    stream = BatchStream(data.examples, batch_size=4, packing=False, max_length=64, seed=0, pad_id=0)
    mb = stream.next_group(1)[0]
    assert mb.tensors["label"].shape == (4,) and mb.n_trained == 4
    with pytest.raises(DataError, match="packing"):
        load_tokenized(cfg.model_copy(update={"packing": True}), "train", tok, **kw)
    with pytest.raises(ValueError, match="packed=False"):
        collate([[ex, ex]], pad_id=0, packed=True)


# ----------------------------------------------------------------------------- save, load, train, eval


@pytest.mark.parametrize("method", ["head", "features"])
def test_save_load_round_trip_gives_equal_logits(llama_dir, tok, tmp_path, method):
    model = fresh(llama_dir, method, labels=["negative", "positive"], pool="mean")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained
    cfg = METHODS[method].config_cls(name=method, labels=["negative", "positive"], pool="mean")
    save_artifact(model, tok, cfg, ModelConfig(name_or_path=str(llama_dir)), tmp_path / "final")
    loaded, _ = tunelab.load(tmp_path / "final")
    assert isinstance(loaded, ClassifierModel) and loaded.label_names == ["negative", "positive"]
    batch = batch_of(tok, ["The lamp was good.", "A stone."])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch["input_ids"], batch["attention_mask"]).logits,
                                   model.eval()(batch["input_ids"], batch["attention_mask"]).logits, rtol=0, atol=0)


def test_accumulation_matches_big_batch(llama_dir, tmp_path):
    """batch 8 x accum 1 and batch 1 x accum 8 apply the same update: the loop counts examples."""
    from safetensors.torch import load_file

    train = tiny.write_jsonl(tmp_path / "train.jsonl", sentiment_records(8))
    states = []
    for bs, acc in ((8, 1), (1, 8)):
        tunelab.train({
            "model": {"name_or_path": str(llama_dir)}, "data": {"train": str(train)},
            "method": {"name": "features", "pool": "mean"}, "objective": {"name": "classify"},
            # a large adam_eps and no clipping make the first step proportional to the gradient, not its sign
            "train": {"max_steps": 1, "batch_size": bs, "grad_accum": acc, "lr": 10.0, "adam_eps": 10.0,
                      "max_grad_norm": None, "tensorboard": False, "precision": "fp32"},
            "output": {"dir": str(tmp_path / f"{bs}x{acc}")},
        }, quiet=True)
        states.append(load_file(str(tmp_path / f"{bs}x{acc}" / "final" / "method.safetensors")))
    assert set(states[0]) == {"head.weight", "head.bias"}
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6)


def test_head_learns_separable_sentiment_and_reloads(llama_dir, tmp_path, capsys, monkeypatch):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", sentiment_records(64))
    cfg = {
        "model": {"name_or_path": str(llama_dir)},
        "data": {"train": str(train), "max_length": 32},
        "method": {"name": "head", "labels": ["negative", "positive"]},
        "objective": {"name": "classify"},
        "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "scheduler": "constant", "tensorboard": False,
                  "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = tunelab.train(cfg, quiet=True)
    assert result.status == "completed"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]
    model, tok = tunelab.load(tmp_path / "run")
    m = evaluate_task((model, tok), str(train))
    assert m["scored_by"] == "head" and m["accuracy"] > 0.9, m
    assert sum(c["n"] for c in m["per_class"].values()) == 64
    again, _ = tunelab.load(tmp_path / "run")
    batch = batch_of(tok, ["The lamp was good.", "The road was awful."])
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]).logits,
                                   model(batch["input_ids"], batch["attention_mask"]).logits, rtol=0, atol=0)
    # the CLI evaluates a head model on a TinyWorld classification task by the head's argmax
    from tunelab.cli import main

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", str(tmp_path / "run"), "--task", "tinyworld:sentiment@test", "--limit", "8", "--json"])
    out = json.loads(capsys.readouterr().out)["tinyworld:sentiment@test"]
    assert e.value.code == 0 and out["scored_by"] == "head" and out["n"] == 8
    assert set(out["per_class"]) == {"negative", "positive"} and 0.0 <= out["accuracy"] <= 1.0


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["head-sentiment.yaml", "features-sentiment.yaml"])
def test_sentiment_configs_build_on_the_meta_device(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.name_or_path == "tunelab-tiny" and cfg.objective.name == "classify"
    assert cfg.data.train == "tinyworld:sentiment" and cfg.data.eval == "tinyworld:sentiment@validation"
    hf_cfg = tiny.config("llama", 400)  # tunelab-tiny's architecture; the embedded weights may not be built
    with torch.device("meta"):
        model = METHODS[cfg.method.name].apply(AutoModelForCausalLM.from_config(hf_cfg), cfg.method)
    trainable, total = count_parameters(model)
    assert isinstance(model, ClassifierModel) and model.head.out_features == 2 and model.label_names
    assert trainable == (total if cfg.method.body == "full" else 32 * 2 + 2)
    if (Path(tunelab.__file__).parent / "assets" / "tiny-base" / "config.json").is_file():
        real = AutoConfig.from_pretrained(str(Path(tunelab.__file__).parent / "assets" / "tiny-base"))
        with torch.device("meta"):
            METHODS[cfg.method.name].apply(AutoModelForCausalLM.from_config(real), cfg.method)


def test_lora_body_trains_only_adapters_and_head_and_round_trips(llama_dir, tok, tmp_path):
    """body: lora (e.g. a reward model): peft adapters on the body's linear layers + the head train, the base body
    weights never change, and the delta artifact reloads to the same scores (a scalar head, num_labels 1)."""
    cfg = METHODS["head"].config_cls(name="head", num_labels=1, body="lora", lora_r=4)
    model = METHODS["head"].apply(AutoModelForCausalLM.from_pretrained(str(llama_dir)), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all("lora_" in n for n in trainable - {"head.weight", "head.bias"}) and len(trainable) > 2
    rank = next(p for n, p in model.named_parameters() if "lora_A" in n).shape[0]
    assert rank == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = batch_of(tok, ["The lamp was good.", "A stone."])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: LoRA B leaves zero after the first, so A moves in the second
        model(batch["input_ids"], batch["attention_mask"]).logits.sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    save_artifact(model, tok, cfg, ModelConfig(name_or_path=str(llama_dir)), tmp_path / "final")
    loaded, _ = tunelab.load(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(batch["input_ids"], batch["attention_mask"]).logits,
                                   model.eval()(batch["input_ids"], batch["attention_mask"]).logits, rtol=0, atol=0)
