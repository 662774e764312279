"""M20 MPT: each task's prompt is P* o (u_k v_k) as the formula, prepended to the embeddings; the batch's
per-token task ids reach peft's forward; without task ids the factors are averaged; the two stages
(source training on a multi-task mixture, then a target prompt started from it) run through the loop,
and every artifact reloads to the same logits without its source."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests.test_train_loop import run_cfg
from tunelab.errors import TunelabError
from tunelab.inference.logits import forward_logits
from tunelab.methods import METHODS
from tunelab.methods import mpt as mpt_module
from tunelab.runconfig import method_config


def base_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(str(llama_dir), torch_dtype=torch.float32).eval()


def mpt(llama_dir, **kw):
    torch.manual_seed(0)
    model = METHODS["mpt"].apply(base_model(llama_dir), method_config({"name": "mpt", **kw})).eval()
    enc = model.prompt_encoder["default"]
    with torch.no_grad():  # factors far from zero, so each task's prompt differs visibly
        enc.prefix_task_cols.normal_(1.0, 0.5)
        enc.prefix_task_rows.normal_(1.0, 0.5)
    return model, enc


def reference(llama_dir, enc, ids: torch.Tensor, tasks: list[int] | None) -> torch.Tensor:
    """Logits of the base fed [P* o (u_k v_k); E(x)] per row, u, v averaged over tasks when `tasks` is None."""
    base = base_model(llama_dir)
    shared = enc.embedding.weight  # (n, d): P*
    u, v = enc.prefix_task_cols, enc.prefix_task_rows  # (K, n, r), (K, r, d)
    rows = []
    for b in range(ids.shape[0]):
        if tasks is None:
            prompt = shared * (u.mean(0) @ v.mean(0))
        else:
            prompt = shared * (u[tasks[b]] @ v[tasks[b]])
        rows.append(torch.cat([prompt, base.get_input_embeddings()(ids[b])], dim=0))
    with torch.no_grad():
        return base(inputs_embeds=torch.stack(rows)).logits


def ids_for(b: int = 3, t: int = 8) -> torch.Tensor:
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(1))


def test_each_tasks_prompt_is_the_shared_prompt_times_its_rank_one_matrix(llama_dir):
    model, enc = mpt(llama_dir, num_tasks=3, num_virtual_tokens=4)
    ids, tasks = ids_for(), [2, 0, 1]
    with torch.no_grad():
        prompts = model.get_prompt(batch_size=3, task_ids=torch.tensor(tasks))  # (B, n, d)
        for b, k in enumerate(tasks):
            want = enc.embedding.weight * torch.outer(enc.prefix_task_cols[k, :, 0], enc.prefix_task_rows[k, 0])
            torch.testing.assert_close(prompts[b], want)
        got = model(input_ids=ids, task_ids=torch.tensor(tasks)).logits
        none = model(input_ids=ids).logits
    torch.testing.assert_close(got, reference(llama_dir, enc, ids, tasks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none, reference(llama_dir, enc, ids, None), rtol=1e-5, atol=1e-5)


def test_the_batchs_per_token_task_ids_reach_the_prompt(llama_dir):
    model, enc = mpt(llama_dir, num_tasks=3, num_virtual_tokens=4)
    ids = ids_for()
    per_token = torch.tensor([[2] * 8, [0] * 5 + [-1] * 3, [1] * 8])  # (B, T) as data/stream.MixtureStream
    with torch.no_grad():
        got = forward_logits(model, {"input_ids": ids, "task_ids": per_token})
        want = model(input_ids=ids, task_ids=torch.tensor([2, 0, 1])).logits[:, -8:]
    torch.testing.assert_close(got, want)
    with pytest.raises(TunelabError, match="(?s)several tasks.*data.packing: false"):
        forward_logits(model, {"input_ids": ids, "task_ids": torch.tensor([[0] * 4 + [1] * 4] * 3)})
    with pytest.raises(TunelabError, match="(?s)prompt has 3 task.*method.num_tasks"):
        forward_logits(model, {"input_ids": ids, "task_ids": torch.full((3, 8), 3)})
    plain = base_model(llama_dir)  # a model without task-specific parts never gets task ids
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(plain, {"input_ids": ids, "task_ids": per_token}), plain(ids).logits)


def source_cfg(llama_dir, chat_data, out):
    cfg = run_cfg(llama_dir, chat_data, out, max_steps=3, lr=5e-2)
    cfg["data"] = {"train": [{"source": str(chat_data[0]), "task": "a"}, {"source": str(chat_data[1]), "task": "b"}],
                   "max_length": 64}
    cfg["method"] = {"name": "mpt", "num_tasks": 2, "num_virtual_tokens": 4}
    return cfg


def test_source_training_then_target_adaptation(llama_dir, chat_data, tmp_path, monkeypatch):
    seen: list[int] = []
    row_tasks = mpt_module._row_tasks

    def record(task_ids: torch.Tensor, n: int) -> torch.Tensor:
        seen.extend(row_tasks(task_ids, n).tolist())
        return row_tasks(task_ids, n)

    monkeypatch.setattr(mpt_module, "_row_tasks", record)
    src = tunelab.train(source_cfg(llama_dir, chat_data, tmp_path / "source"), quiet=True)
    assert src.status == "completed" and set(seen) == {0, 1}  # the training batches' task ids reached the prompt
    source, _ = tunelab.load(tmp_path / "source")
    s_enc = source.prompt_encoder["default"]
    assert s_enc.prefix_task_cols.shape == (2, 4, 1)
    # stage (b) at init: P* and the factors averaged over the source tasks (or one task's)
    for task in (None, 1):
        kw = {"init_from": str(tmp_path / "source"), "num_virtual_tokens": 4}
        target = METHODS["mpt"].apply(base_model(llama_dir), method_config({"name": "mpt", **kw, "init_task": task}))
        t_enc = target.prompt_encoder["default"]
        torch.testing.assert_close(t_enc.embedding.weight, s_enc.embedding.weight)
        for name in ("prefix_task_cols", "prefix_task_rows"):
            got, src = getattr(t_enc, name), getattr(s_enc, name)
            torch.testing.assert_close(got[0], src.mean(0) if task is None else src[task])
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "target", max_steps=2, lr=5e-2)
    cfg["method"] = {"name": "mpt", "num_virtual_tokens": 4, "init_from": str(tmp_path / "source")}
    trained = tunelab.train(cfg, quiet=True)
    assert trained.status == "completed"
    shutil.rmtree(tmp_path / "source")  # the target artifact stands alone
    loaded, _ = tunelab.load(tmp_path / "target")
    ids = ids_for()
    with torch.no_grad():
        assert not torch.allclose(loaded.eval()(input_ids=ids).logits[:, -8:], base_model(llama_dir)(ids).logits)


def test_a_prompt_run_starts_the_shared_prompt_unchanged(llama_dir, chat_data, tmp_path):
    cfg = run_cfg(llama_dir, chat_data, tmp_path / "prompt", max_steps=1, lr=5e-2)
    cfg["method"] = {"name": "prompt", "num_virtual_tokens": 4}
    tunelab.train(cfg, quiet=True)
    prompt, _ = tunelab.load(tmp_path / "prompt")
    target = METHODS["mpt"].apply(base_model(llama_dir), method_config(
        {"name": "mpt", "num_virtual_tokens": 4, "init_from": str(tmp_path / "prompt")}))
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=ids).logits, prompt.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("kw, problem", [
    ({"init_from": "nowhere"}, "holds no saved prompt adapter"),
    ({"init_from": "SRC", "num_virtual_tokens": 5}, "init_from has 4 virtual tokens"),
    ({"init_from": "SRC", "num_virtual_tokens": 4, "init_task": 7}, "init_task 7 but init_from has 2 tasks"),
])
def test_bad_starts_are_one_line_errors(kw, problem, llama_dir, chat_data, tmp_path):
    if kw.get("init_from") == "SRC":
        tunelab.train(source_cfg(llama_dir, chat_data, tmp_path / "source"), quiet=True)
        kw = {**kw, "init_from": str(tmp_path / "source")}
    with pytest.raises(TunelabError, match=problem):
        METHODS["mpt"].apply(base_model(llama_dir), method_config({"name": "mpt", **kw}))


def test_config_errors_name_the_fix():
    with pytest.raises(Exception, match="num_tasks: 1"):
        method_config({"name": "mpt", "init_from": "runs/x", "num_tasks": 3})
    with pytest.raises(Exception, match="set init_from too"):
        method_config({"name": "mpt", "init_task": 0})
