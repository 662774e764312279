"""Meta-learning (recipes/meta.py) against naive references written here: MAML's meta-gradient vs
central finite differences (float64, an MLP and a tiny Llama with LoRA / a soft prompt), FOMAML and
MAML vs their closed forms on quadratics, Reptile's update vs θ + ε mean(φ_i − θ); the bad inputs;
and meta_train + adapt_eval end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests import tiny
from tunelab.config import pick_config
from tunelab.data.types import IGNORE
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.methods import METHODS
from tunelab.recipes import meta
from tunelab.recipes.run import train
from tunelab.runconfig import build_config

# ----------------------------------------------------------------------------- naive references


def naive_adapted_loss(params: dict[str, torch.Tensor], loss_fn, support, query, steps: int, lr: float) -> float:
    """L_query after `steps` plain SGD steps on support, gradients by autograd one step at a time."""
    phi = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(steps):
        for p in phi.values():
            p.requires_grad_(True)
        grads = torch.autograd.grad(loss_fn(phi, support), list(phi.values()), allow_unused=True)
        phi = {n: (p - lr * (g if g is not None else 0)).detach() for (n, p), g in zip(phi.items(), grads, strict=True)}
    with torch.no_grad():
        return loss_fn(phi, query).item()


def finite_difference(params, loss_fn, support, query, steps, lr, h=1e-6) -> dict[str, torch.Tensor]:
    """Central differences of naive_adapted_loss, every coordinate."""
    def bumped(name: str, i: int, by: float) -> dict[str, torch.Tensor]:
        p = params[name].detach().clone()
        p.view(-1)[i] += by
        return {**params, name: p}

    out = {}
    for name, p in params.items():
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            g.view(-1)[i] = (naive_adapted_loss(bumped(name, i, h), loss_fn, support, query, steps, lr)
                             - naive_adapted_loss(bumped(name, i, -h), loss_fn, support, query, steps, lr)) / (2 * h)
        out[name] = g
    return out


def directional_fd(params, loss_fn, support, query, steps, lr, direction, h=1e-6) -> float:
    plus = {n: p + h * direction[n] for n, p in params.items()}
    minus = {n: p - h * direction[n] for n, p in params.items()}
    return (naive_adapted_loss(plus, loss_fn, support, query, steps, lr)
            - naive_adapted_loss(minus, loss_fn, support, query, steps, lr)) / (2 * h)


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum((a[n] * b[n]).sum().item() for n in a)


# ----------------------------------------------------------------------------- MAML vs finite differences


def mlp_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}

    def loss_fn(ps, data):
        x, y = data
        return ((functional_call(net, ps, (x,)) - y) ** 2).mean()

    support = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    query = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    return params, loss_fn, support, query


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_equals_finite_differences_on_an_mlp(steps):
    params, loss_fn, support, query = mlp_problem()
    lr = 0.5
    grads, loss = meta.meta_gradient(params, loss_fn, support, query, steps, lr, order=2)
    ref = finite_difference(params, loss_fn, support, query, steps, lr)
    assert loss == pytest.approx(naive_adapted_loss(params, loss_fn, support, query, steps, lr), rel=1e-12)
    for n in params:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-6, atol=1e-8)
    # first order is a different number here: the test above has teeth
    first, _ = meta.meta_gradient(params, loss_fn, support, query, steps, lr, order=1)
    assert max((first[n] - ref[n]).abs().max().item() for n in params) > 1e-4


def tiny_llama_with(method: dict, seed: int = 0):
    tok = tiny.tokenizer()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny.config("llama", len(tok))).double()
    model = METHODS[method["name"]].apply(base, pick_config("method", method, METHODS))
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(seed + 1)
    params = {n: p.double() + 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)  # LoRA's B != 0
              for n, p in params.items()}
    return model, params, len(tok)


@pytest.fixture
def float64_rms_norm(monkeypatch):
    """transformers' Llama RMSNorm computes in float32 whatever the model's dtype: finite differences
    need float64 throughout."""
    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def token_batch(vocab: int, seed: int, b: int = 3, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a masked prompt, as the pipeline writes
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    labels[0, -2:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def float64_lm_loss(model: nn.Module):
    """The replies' token-mean NLL, all in float64 (the library's loss computes its cross-entropy in
    float32, too coarse for finite differences)."""
    def loss(ps, batch):
        ids = batch["input_ids"]
        out = functional_call(model, ps, (), {"input_ids": ids, "attention_mask": batch["attention_mask"],
                                               "use_cache": False})
        logits = out.logits[:, -ids.shape[1]:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)
    return loss


METHODS_TRIED = [{"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                 {"name": "prompt", "num_virtual_tokens": 2}]
INNER_LR = {"lora": 0.5, "prompt": 300.0}  # a soft prompt's gradients are small: a step that moves it


@pytest.mark.parametrize("method", METHODS_TRIED, ids=["lora", "prompt"])
def test_maml_meta_gradient_through_a_tiny_llama_equals_finite_differences(method, float64_rms_norm):
    model, params, vocab = tiny_llama_with(method)
    loss_fn = float64_lm_loss(model)
    support, query = token_batch(vocab, 1), token_batch(vocab, 2)
    steps, lr = 2, INNER_LR[method["name"]]
    grads, _ = meta.meta_gradient(params, loss_fn, support, query, steps, lr, order=2)
    first, _ = meta.meta_gradient(params, loss_fn, support, query, steps, lr, order=1)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # random directions through every meta-parameter at once
        v = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        ref = directional_fd(params, loss_fn, support, query, steps, lr, v)
        assert dot(grads, v) == pytest.approx(ref, rel=1e-6)
    diff = {n: first[n] - grads[n] for n in grads}
    assert dot(diff, diff) > 0.05**2 * dot(grads, grads)  # the second-order term matters here


@pytest.mark.parametrize("method", METHODS_TRIED, ids=["lora", "prompt"])
def test_lm_loss_is_the_replies_token_mean_nll(method):
    model, params, vocab = tiny_llama_with(method)
    batch = token_batch(vocab, 1)
    assert meta.lm_loss(model)(params, batch).item() == pytest.approx(float64_lm_loss(model)(params, batch).item(),
                                                                      rel=1e-6)


# ----------------------------------------------------------------------------- closed forms on quadratics


def quadratic(dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return m @ m.T / dim + 0.5 * torch.eye(dim, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)


def split_loss(ps, data):
    """½ (θ − c)ᵀ A (θ − c) with θ split over two named tensors."""
    a, c = data
    d = torch.cat([ps["u"], ps["v"].reshape(-1)]) - c
    return 0.5 * d @ a @ d


def as_params(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"u": theta[:2].clone(), "v": theta[2:].reshape(2, 2).clone()}


def flat(ps: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([ps["u"], ps["v"].reshape(-1)])


@pytest.mark.parametrize("k", [1, 4])
def test_fomaml_and_maml_match_their_closed_forms_on_quadratics(k):
    (a, ca), (b, cb) = quadratic(6, 1), quadratic(6, 2)
    theta = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lr = 0.2
    step = torch.eye(6, dtype=torch.float64) - lr * a  # one SGD step on the support is affine: M = I − αA
    mk = torch.linalg.matrix_power(step, k)
    phi = ca + mk @ (theta - ca)
    fomaml = b @ (phi - cb)  # ∇L_Q at φ
    maml = mk.T @ fomaml  # the inner loop's Jacobian (M^k)ᵀ applied to it
    got2, loss = meta.meta_gradient(as_params(theta), split_loss, (a, ca), (b, cb), k, lr, order=2)
    got1, _ = meta.meta_gradient(as_params(theta), split_loss, (a, ca), (b, cb), k, lr, order=1)
    torch.testing.assert_close(flat(got2), maml)
    torch.testing.assert_close(flat(got1), fomaml)
    assert loss == pytest.approx((0.5 * (phi - cb) @ b @ (phi - cb)).item())


def test_reptile_step_equals_the_formula():
    theta = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tasks = [quadratic(6, s) for s in (5, 6, 7)]
    k, lr, eps = 3, 0.1, 0.4
    phis = [c + torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - lr * a, k) @ (theta - c)
            for a, c in tasks]
    expected = theta + eps * sum(phi - theta for phi in phis) / len(phis)
    new, first_loss = meta.reptile_step(as_params(theta), split_loss, tasks, k, lr, eps)
    torch.testing.assert_close(flat(new), expected)
    assert first_loss == pytest.approx(sum(split_loss(as_params(theta), t).item() for t in tasks) / 3)
    adapted = [as_params(phi) for phi in phis]
    torch.testing.assert_close(flat(meta.reptile_update(as_params(theta), adapted, eps)), expected)


def test_adapt_keeps_no_graph_unless_asked():
    params = as_params(torch.zeros(6, dtype=torch.float64))
    data = quadratic(6, 1)
    assert all(p.grad_fn is None for p in meta.adapt(params, split_loss, data, 2, 0.1).values())
    theta = {n: p.requires_grad_() for n, p in params.items()}
    assert all(p.grad_fn is not None for p in meta.adapt(theta, split_loss, data, 2, 0.1, create_graph=True).values())


# ----------------------------------------------------------------------------- bad input


def record(task: str | None = "t1", split: str | None = "support") -> dict:
    r = {"messages": [{"role": "user", "content": "Translate: lor"}, {"role": "assistant", "content": "five"}]}
    return {**r, **({"task": task} if task else {}), **({"split": split} if split else {})}


def one_line(e: TunelabError) -> None:
    assert "\n" not in e.message and e.fix


@pytest.mark.parametrize("records, words", [
    ([record(task=None)], "record 1 has no 'task' field"),
    ([record(), record(split=None)], "record 2 has no 'split' field"),
    ([{"messages": []}], "no 'task' and 'split' fields"),
    ([record(), record(split="train")], "split 'train'"),
    ([record(), record("t1", "query"), record("t2", "support")], "task 't2' has no query records"),
    ([record("t1", "query")], "task 't1' has no support records"),
    ([], "no records"),
])
def test_task_records_without_the_fields_or_splits_are_one_line_errors(records, words):
    with pytest.raises(DataError, match=words) as e:
        meta.group_tasks(records, "data.jsonl")
    one_line(e.value)


def test_unknown_algorithm_and_keys_are_named():
    with pytest.raises(ConfigError, match=r"meta.algorithm: Input should be 'maml', 'fomaml' or 'reptile'"):
        meta.split_config({"meta": {"algorithm": "protonet"}})
    with pytest.raises(ConfigError, match=r"meta.inner_step: unknown key \(did you mean 'inner_steps'\?\)"):
        meta.split_config({"meta": {"inner_step": 3}})
    with pytest.raises(ConfigError, match="meta: a mapping"):
        meta.split_config({"meta": "maml"})
    with pytest.raises(ConfigError, match="objective dpo"):
        meta.split_config({"objective": {"name": "dpo"}, "data": {"train": "x.jsonl"}})


def test_a_method_without_trainable_parameters_is_refused():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(TunelabError, match="method x leaves no trainable parameter") as e:
        meta.trainable_params(frozen, "x")
    one_line(e.value)


def test_a_method_with_step_hooks_is_refused_before_loading():
    cfg = build_config({"method": {"name": "dylora"}})
    with pytest.raises(TunelabError, match="method dylora acts between steps") as e:
        meta.build_model(cfg, 0)
    one_line(e.value)


def test_a_foreign_out_dir_and_an_init_without_config_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TunelabError, match="not empty and tunelab did not write it") as e:
        meta.meta_train({"meta": {}}, None, tmp_path)
    assert e.value.fix
    with pytest.raises(TunelabError, match="carries no config") as e:
        meta.adapt_eval("base", None)
    one_line(e.value)
    with pytest.raises(TunelabError, match="not an initialisation"):
        meta.adapt_eval(tmp_path / "notes.txt", {"meta": {}})


def test_the_shipped_config_builds():
    cfg, m = meta.load_meta_config("meta-lora")
    assert cfg.method.name == "lora" and m.algorithm in ("maml", "fomaml", "reptile")
    assert m.adapt_steps == [1, 5, 20]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """Two tasks of the `meta` kind written for the tiny tokenizer's words."""
    d = tmp_path_factory.mktemp("meta-tasks")
    records = []
    for t, words in (("a", ["red", "blue"]), ("b", ["teal", "olive"])):
        mapping = dict(zip(["lor", "tav"], words, strict=True))
        for split, seqs in (("support", [["lor"], ["tav"], ["lor", "tav"]]), ("query", [["tav", "lor"]])):
            for s in seqs:
                answer = " ".join(mapping[x] for x in s)
                records.append({"messages": [{"role": "user", "content": f"Translate: {' '.join(s)}"},
                                             {"role": "assistant", "content": answer}],
                                "answer": answer, "task": t, "split": split})
    return tiny.write_jsonl(d / "tasks.jsonl", records)


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_meta_train_then_adapt_eval_end_to_end(llama_dir, task_file, tmp_path, algorithm):
    config = {"model": {"name_or_path": str(llama_dir)}, "data": {"max_length": 64},
              "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
              "meta": {"algorithm": algorithm, "inner_steps": 2, "inner_lr": 0.5, "outer_lr": 0.01 if algorithm ==
                       "maml" else 0.5, "tasks_per_step": 2, "outer_steps": 4, "tasks": str(task_file), "val_tasks": 0,
                       "eval_tasks": str(task_file), "adapt_steps": [2]}}
    lines: list[str] = []
    out = tmp_path / "meta"
    result = meta.meta_train(config, None, out, say=lines.append)
    assert sorted(p.name for p in out.iterdir()) == [".tunelab-owned.json", "init.safetensors", "meta.json"]
    saved = json.loads((out / "meta.json").read_text())
    assert saved["curve"] == result["curve"] and len(saved["curve"]) == 5
    assert any(line.startswith("meta step 4/4") and "eta" in line for line in lines)
    assert str(tmp_path) not in json.dumps(saved["curve"])

    learned = meta.adapt_eval(out, steps=[2], say=lines.append)
    base = meta.adapt_eval("base", config, steps=[2], say=lines.append)
    assert learned["steps"] == [0, 2] and learned["n_tasks"] == 2 and len(learned["per_task"]) == 2
    assert 0.0 <= learned["exact_match"]["2"]["mean"] <= 1.0
    assert meta.adapt_table(learned).splitlines()[2].split()[0] == "0"
    # adapting lowers the query loss, and the meta-learned init after 2 steps beats the base's
    assert base["query_loss"]["2"]["mean"] < base["query_loss"]["0"]["mean"]
    assert learned["query_loss"]["2"]["mean"] < base["query_loss"]["2"]["mean"]
    if algorithm == "maml":  # adapt_eval's 2 SGD steps at inner_lr are the inner loop: its curve is the same loss
        curve = [p["query_loss"] for p in result["curve"][1:]]
        assert curve[-1] < curve[0]
        assert base["query_loss"]["2"]["mean"] == pytest.approx(curve[0], rel=1e-4)

    with pytest.raises(TunelabError, match="already holds a meta-learned init"):
        meta.meta_train(config, None, out, say=lines.append)
    meta.meta_train(config, ["meta.outer_steps=1"], out, say=lines.append, overwrite=True)
    assert len(json.loads((out / "meta.json").read_text())["curve"]) == 2


def test_adapt_eval_starts_from_a_trained_run(llama_dir, task_file, tmp_path):
    run = tmp_path / "run"
    train({"model": {"name_or_path": str(llama_dir)}, "data": {"train": str(task_file), "max_length": 64},
           "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "tensorboard": False},
           "output": {"dir": str(run)}}, quiet=True)
    got = meta.adapt_eval(run, {"meta": {"eval_tasks": str(task_file)}}, steps=[1], say=tiny.quiet)
    assert got["n_tasks"] == 2 and got["steps"] == [0, 1]
    fresh = meta.adapt_eval("base", {"model": {"name_or_path": str(llama_dir)}, "data": {"max_length": 64},
                                     "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
                                     "meta": {"eval_tasks": str(task_file)}}, steps=[1], say=tiny.quiet)
    assert got["query_loss"]["0"]["mean"] != pytest.approx(fresh["query_loss"]["0"]["mean"])  # the run's adapter
