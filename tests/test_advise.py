"""`tunelab advise`: closed forms on a Llama-2-7B config built on the meta device (no weight
allocated), activations against the bytes autograd really saves on tiny random models, the fit
search, every registered method and objective, and bad input as one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests import tiny
from tunelab.cli import main
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.registry import RunContext
from tunelab.recipes import advise as adv
from tunelab.recipes.advise_objectives import PLANS
from tunelab.training import memory

D, FF, L, H, VOCAB = 4096, 11008, 32, 32, 32000
N_7B = 6_738_415_616
GiB = 2**30


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-2-7b")
    LlamaConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
                num_key_value_heads=H, vocab_size=VOCAB, max_position_embeddings=4096).save_pretrained(str(path))
    return str(path / "config.json")  # a config.json alone is enough


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with weights and tokenizer (the distillation test's teacher too)."""
    return tiny.save_model(tmp_path_factory.mktemp("tiny-llama"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["advise", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ----------------------------------------------------------------------------- closed forms, 7B on meta


def test_lora_q_v_r16(llama7b, capsys):
    code, out, _ = run(capsys, "--model", llama7b, "--method", "lora", "r=16", "target_modules=[q_proj,v_proj]",
                       "--device", "cpu", "--json")
    r = json.loads(out)
    n = L * 2 * 16 * (D + D)
    assert code == 0 and r["parameters"]["trainable"] == n == 8_388_608
    assert r["bytes"]["gradients"] == 4 * n
    assert r["bytes"]["optimizer"] == 8 * n + 4 * (L * 2 * 2)  # exp_avg + exp_avg_sq fp32, a 4-byte step per tensor
    assert r["parameters"]["total"] == N_7B + n


def test_full_adamw_states_are_8_bytes_per_parameter(llama7b):
    s = adv.prepare(llama7b, "full")
    e = adv.estimate(s, 1, 512, False)
    tensors = L * 9 + 3  # 7 projections + 2 norms per block; embeddings, final norm, head
    assert s.counts.trainable == N_7B and s.counts.weights["float32"] == 4 * N_7B and e.grads == 4 * N_7B
    assert e.optimizer == 8 * N_7B + 4 * tensors


def nf4(n: int) -> int:
    """NF4 with double quantisation: 4-bit codes, uint8 absmax per 64, fp32 absmax per 256 of those,
    the 256-entry fp32 code of that, an fp32 offset, the 16-entry fp32 NF4 code."""
    return n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 1024 + 4 + 64


def test_qlora_weights_in_4_bits_with_their_constants(llama7b):
    s = adv.prepare(llama7b, "qlora", ["r=16", "target_modules=[q_proj,v_proj]"], device="a100")
    lora = L * 2 * 16 * (D + D)
    per_block = 4 * nf4(D * D) + 3 * nf4(D * FF)
    assert s.counts.weights["nf4"] == L * per_block
    # embeddings, head and norms stay float (fp32: prepare_model_for_kbit_training upcasts them), LoRA fp32
    assert s.counts.weights["float32"] == 4 * (2 * VOCAB * D + (2 * L + 1) * D + lora)
    assert 3.0 * GiB < s.counts.weights["nf4"] < 3.2 * GiB  # ~0.52 bytes per weight
    assert s.optimizer == "paged_adamw_8bit"  # the config's, on a CUDA device
    e = adv.estimate(s, 1, 512, False)
    assert e.optimizer == (L * 2 * 2) * (2 * 16 * D + 8 * 16 * D // 256) + 2 * 256 * 4


def test_full_activations_closed_form(llama7b):
    """Every tensor autograd saves, written out for fp32 full fine-tuning of a padded batch."""
    b, t = 2, 1024
    n = b * t
    per_block = 4 * n * (6 * D + 4 * D + 4 * FF + H + 2) + 4 * n * t  # + the additive mask SDPA keeps
    head = 4 * n * (3 * D + 1) + 4 * b * (t - 1) * VOCAB + 8 * b * (t - 1)  # final norm, log-softmax, labels
    shared = 2 * t * (D // H) * 4 + 8 * n  # RoPE cos/sin, token ids of the embedding
    s = adv.prepare(llama7b, "full", ["train.precision=fp32"], device="a100")
    a = adv.estimate(s, b, t, False).act
    assert a.saved == L * per_block + head + shared
    # checkpointing keeps every block's input, the boolean mask the blocks share, and the head
    assert a.checkpointed == L * 4 * n * D + shared + n * t + head
    assert a.recompute == per_block


def test_bf16_autocast_keeps_2_byte_weight_copies(llama7b):
    s = adv.prepare(llama7b, "full", ["train.precision=bf16"], device="a100")
    a = adv.estimate(s, 1, 128, False).act
    matrices = L * (4 * D * D + 3 * D * FF) + VOCAB * D  # every weight on the gradient path (not the embedding)
    assert a.weight_copies == 2 * matrices


def test_70b_in_seconds_and_the_fit_search(tmp_path):
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192).save_pretrained(str(tmp_path))
    s = adv.prepare(str(tmp_path), "qlora", ["r=16", "model.dtype=bfloat16"], device="h100")
    assert 35 * GiB < s.counts.weight_bytes < 45 * GiB
    budget = 80 * GiB
    f = adv.fit(s, budget, 4, 4096, True)
    assert f["max_batch"] > 0
    assert adv.estimate(s, f["max_batch"], 4096, True).peak <= budget < adv.estimate(s, f["max_batch"] + 1, 4096,
                                                                                        True).peak
    assert adv.estimate(s, 4, f["max_seq"], True).peak <= budget < adv.estimate(s, 4, f["max_seq"] + 1, True).peak


@pytest.mark.parametrize("kind", ["adamw", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_optimizer_bytes_are_the_states_the_optimizers_keep(kind):
    """Against the optimizers themselves (bitsandbytes' unpaged twins run on CPU), after one step."""
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.randn(300, 100)), torch.nn.Parameter(torch.randn(64)),
              torch.nn.Parameter(torch.randn(1000, 33))]
    cls = {"adamw": torch.optim.AdamW, "paged_adamw_32bit": bnb.optim.AdamW32bit,
           "paged_adamw_8bit": bnb.optim.AdamW8bit}[kind]
    opt = cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    states = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    assert sum(states.values()) == memory.optimizer_bytes([(p.numel(), 4) for p in params], kind)


@pytest.mark.parametrize("shape, double_quant", [((128, 128), True), ((352, 128), False), ((1000, 64), True)])
def test_nf4_bytes_are_what_bitsandbytes_stores(shape, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(torch.randn(*shape), requires_grad=False, compress_statistics=double_quant,
                          quant_type="nf4").to("cpu")  # moving it is what quantises it
    qs = p.quant_state
    tensors = [p.data, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
    assert sum(t.numel() * t.element_size() for t in tensors) == memory.nf4_bytes(shape[0] * shape[1], double_quant)


# ----------------------------------------------------------------------------- against autograd


def saved_bytes(model, runtime, batch, autocast: bool) -> int:
    """Bytes of the storages autograd saves in one forward + loss (parameters excluded)."""
    frozen = getattr(runtime, "teacher", None)
    tensors = [*model.parameters(), *model.buffers(), *(frozen.parameters() if frozen is not None else [])]
    params = {t.untyped_storage().data_ptr() for t in tensors}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        runtime.loss(model, batch)
    return sum(seen.values())


def batch_of(rows: int, seq: int, pairs: bool, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[-1, -seq // 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : seq // 4] = -100
    batch = {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}
    return {**batch, "n_pairs": torch.tensor(rows // 2)} if pairs else batch


@pytest.mark.parametrize("method, overrides, objective, autocast", [
    ("full", [], "sft", False), ("lora", ["r=4"], "sft", False), ("lora", ["r=4"], "dpo", False),
    ("prompt", [], "sft", False), ("adapters", [], "dpo", False), ("lora", ["r=4"], "sft", True),
    ("full", [], "distill", False), ("lora", ["r=4"], "simpo", False), ("full", [], "orpo", False),
    ("lora", ["r=4"], "kto", False),
])
def test_activations_match_what_autograd_saves(tiny_dir, method, overrides, objective, autocast):
    extra = ["train.precision=bf16"] if autocast else []
    cfg, _ = adv.run_config(str(tiny_dir), method, overrides + extra, objective)
    torch.manual_seed(0)
    hf = LlamaConfig.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa")
    model = METHODS[method].apply(model, cfg.method).train()
    runtime = OBJECTIVES[objective].make_runtime(RunContext(cfg, model, None, torch.device("cpu"), tiny.quiet))
    rows, seq = 2, 24
    pairs = objective in ("dpo", "simpo", "orpo")
    batch = batch_of(rows * (2 if pairs else 1), seq, pairs, hf.vocab_size)
    if objective == "kto":  # unpaired: one rating per row
        batch["label"] = torch.tensor([1, 0])
    if objective == "distill":  # text data: every token trains (what the estimate assumes for the divergence)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    got = saved_bytes(model, runtime, batch, autocast)
    s = adv.prepare(str(tiny_dir), method, overrides + extra, objective=objective, device="cpu")
    est = adv.estimate(s, rows, seq, False).act.saved
    assert abs(est - got) <= 0.10 * got, (est, got)


# ----------------------------------------------------------------------------- registries, CLI


def test_every_objective_has_a_memory_plan():
    assert set(OBJECTIVES) <= set(PLANS)


def test_every_method_and_objective_is_estimated(tiny_dir):
    settings = {"partial": ["last_k=1"], "adalora": ["total_step=10"], "peft": ["peft_type=IA3"]}
    for name in METHODS:
        s = adv.prepare(str(tiny_dir), name, settings.get(name, []))
        assert adv.estimate(s, 2, 16, False).peak > s.counts.weight_bytes
    for name in OBJECTIVES:
        s = adv.prepare(str(tiny_dir), "lora", objective=name)
        e = adv.estimate(s, 2, 16, False)
        assert e.peak > e.weights


def test_ppo_with_a_verifiable_reward_counts_no_reward_model(tiny_dir):
    rm = adv.prepare(str(tiny_dir), "lora", objective="ppo")  # neither given: the model as its reward model
    fn = adv.prepare(str(tiny_dir), "lora", ["objective.reward=exact_match"], objective="ppo")
    assert rm.cfg.objective.reward_model == str(tiny_dir) and any("objective.reward_model" in n for n in rm.notes)
    assert fn.cfg.objective.reward_model is None and not any("reward_model" in n for n in fn.notes)
    assert sum(x.bytes for x in fn.plan.extras) < sum(x.bytes for x in rm.plan.extras)


def test_dpo_reference_is_a_copy_only_without_an_adapter(tiny_dir):
    lora = adv.prepare(str(tiny_dir), "lora", objective="dpo")
    full = adv.prepare(str(tiny_dir), "full", objective="dpo")
    assert [x.bytes for x in lora.plan.extras] == [0] and lora.plan.rows == 2
    assert [x.bytes for x in full.plan.extras] == [full.counts.weight_bytes]


def test_every_method_table(tiny_dir, capsys):
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--memory", "64MiB", "--json")
    rows = {r["method"]: r for r in json.loads(out)["methods"]}
    assert code == 0 and set(rows) == set(METHODS)
    assert rows["lora"]["fits"] is True and rows["lora"]["max_batch"] >= 1
    assert "error" in rows["partial"]  # needs a selection: said in a note, not a crash


@pytest.mark.parametrize("memory, expected", [("24GiB", 24 * GiB), ("80 GB", 80 * 10**9), ("1.5TiB", int(1.5 * 2**40)),
                                              ("512MiB", 512 * 2**20), ("1000", 1000)])
def test_parse_memory(memory, expected):
    assert adv.parse_memory(memory) == expected


@pytest.mark.parametrize("args, says", [
    (["--method", "lorra"], "did you mean 'lora'"),
    (["--method", "lora", "rr=4"], "did you mean 'r'"),
    (["--method", "lora", "--memory", "24XB"], "not a memory size"),
    (["--method", "lora", "--device", "h1000"], "unknown"),
])
def test_bad_input_is_one_line(tiny_dir, capsys, args, says):
    code, _, err = run(capsys, "--model", str(tiny_dir), *args)
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_a_folder_without_config_json(tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path), "--method", "lora")
    assert code == 2 and "no config.json" in err and "Traceback" not in err


def test_table(tiny_dir, capsys):
    code, out, _ = run(capsys, "--model", str(tiny_dir), "--method", "lora", "--memory", "1GiB", "--seq", "64")
    assert code == 0
    for word in ("weights (float32)", "trainable parameters", "gradients", "optimizer states", "activations", "peak",
                 "fits", "time per step"):
        assert word in out
