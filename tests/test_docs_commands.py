"""Every shell command in README.md and docs/ runs here, on a tiny random model, or is marked with
why not: a doc command that stops working fails this file, a new one fails it until COMMANDS
classifies it, and an entry of COMMANDS that no doc holds any more fails it as stale.

What counts as a command: the lines of fenced blocks labelled bash, sh or shell; in a console
block, the `$ ` lines; in an unlabelled block, its lines if any of them starts with a program the
docs run (PROGRAM). The other unlabelled blocks are output shown as an example (the data flow
diagram, a run dir's file listing, a progress line): none of their lines starts with a program.
`# comments` outside quotes are dropped, and a line ending in `\\` or inside an open quote is
joined with the next (so a multi-line `python -c "..."` is one command).

How a runnable command runs: each doc's commands in document order, in one scratch folder holding
`configs/` (a link to the shipped configs), so that `runs/a` made by one command is there for the
next. `tunelab ...` runs in this process (`tunelab.cli.main`, the console script's entry point),
`python ...` as a subprocess. It must exit 0 and print no traceback. What differs from a user's
shell, and why (`rules()` is the only code that changes a command):

- `tunelab-tiny`, the embedded base the shipped configs and the commands name, resolves to a tiny
  random Llama (4 layers of width 32, as `configs/distill.yaml` keeps layers 0 and 3) with a real
  BPE tokenizer and the ChatML template (tests/tiny.py), through `tunelab.modeling.load.ASSETS`:
  this checks that the commands work, in seconds, not what they measure.
- `tunelab train`, `tunelab tune` and `tunelab continual` get TRAIN_OVERRIDES appended (the last value
  of a key wins): 2 steps of 2 sequences. Every train of a doc gets the same ones, so a `--resume`
  finds the config it started with. `tunelab tune` also gets `--trials 2` (the last one given wins),
  `tunelab continual` `continual.eval_limit=4`.
- `tunelab eval` and `tunelab score` without `--limit` get `--limit 4` (the first 4 records of each
  task, of the probe and of the scored data).
- A placeholder (PLACEHOLDERS) becomes a real value; `python -m tunelab` is `tunelab`.
- A data file named by `--data` that is not there (`my_test.jsonl`) is written: 8 chat records.
- ASSUMED runs first what a doc's commands presume exists and do not create themselves.
- TinyWorld's task files are generated once into a scratch `$TUNELAB_CACHE` and cut to their first
  TINYWORLD_RECORDS records: tokenizing whole splits would cost more than the 2 steps.
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_LABELS = {"bash", "sh", "shell", "console"}
# A line of an unlabelled block that starts like this makes the block commands (the docs' output
# examples start with a path, a box-drawn diagram or a log line, never with one of these).
PROGRAM = re.compile(r"(\$ |\. )|(tunelab|python3?|make|pip|uv|\.venv/bin/\S+)(\s|$)")

RUN = "run"
NETWORK = "network: installs from the package index"
BENCH = "minutes long; its numbers are published in docs/results/ by this benchmark"
SUITE = "runs the test suite, which holds this file"
GPU_BENCH = ("an 8B- or 3B-shaped model on a CUDA GPU with ~140 GB; tests/test_bench_gpu.py runs the same script at "
             "toy size on CPU")
META = ("meta-training and few-shot evaluation over whole task families (minutes): tests/test_meta.py runs "
        "meta_train and adapt_eval end to end on a tiny model, bench/regimes_meta.py at full size")
SERVER = ("a server that runs until stopped, or a request to one: tests/test_serve.py starts it on a socket and "
          "sends these")

GGUF = ("llama.cpp's converter and runtime on a LoRA run (a minute): tests/test_gguf.py runs this export end to "
        "end on tunelab-tiny itself (slow)")
GGUF_ELSEWHERE = ("runs the exported file in llama.cpp's CLI, Ollama or llama-cpp-python on an export the previous "
                  "command made; tests/test_gguf.py loads such exports with llama-cpp-python")
UI = ("the web UI, a server that runs until stopped: tests/test_ui.py starts it on a socket and drives it with "
      "Chromium")
UI_SHOTS = "the browser test of tests/test_ui.py, writing the screenshots of docs/ui.md"

COMPARE = ("trains its cells in child processes, which load the real base (minutes); tests/test_compare.py runs "
           "compare end to end on tiny models")
# Every command of the docs: RUN, or why it does not run here.
COMMANDS: dict[str, str] = {
    # README.md
    "make demo": "creates .venv from the lock (network) and tunes the embedded base (minutes); "
                 "tests/test_install.py runs `tunelab demo` from the built wheel",
    "make test": SUITE,
    "make lock": NETWORK + " (uv resolves the newest versions the ranges allow)",
    "make test-latest": NETWORK + " (the newest releases), then the suite",
    "pip install torch": NETWORK,
    'pip install -e ".[dev]"': NETWORK,
    "grep -v '^torch==' requirements/lock.txt | sed '/^    --hash/d; s/ \\\\$//' > /tmp/constraints.txt":
        "a step of the install recipe: writes the constraints of the `pip install` after it (network)",
    'pip install -e ".[dev]" -c /tmp/constraints.txt': NETWORK,
    ". .venv/bin/activate": "shell set-up; this test runs the tunelab of its own environment",
    "tunelab methods": RUN,
    "tunelab train sft-lora train.max_steps=20": RUN,
    "tunelab data check configs/sft-lora.yaml": RUN,
    "tunelab train configs/sft-lora.yaml train.max_steps=200 output.dir=runs/a": RUN,
    "tunelab train configs/sft-lora.yaml train.max_steps=200 output.dir=runs/a --resume": RUN,
    "tunelab train runs/a --resume": RUN,
    "tunelab eval runs/a --data my_test.jsonl --json": RUN,
    "tunelab eval runs/a --task tinyworld:qa@test --forgetting --json": RUN,
    'tunelab generate runs/a --prompt "Where does Noor Mendez live?"': RUN,
    "tunelab export runs/a --merge --out merged/": RUN,
    "tunelab score runs/align-reward --data tinyworld:prefs@test": RUN,
    "python -m tunelab --help": RUN,
    '.venv/bin/pytest -q -m "not slow"': SUITE,
    "python bench/throughput.py": BENCH,
    "python bench/methods.py": BENCH,
    "python bench/alignment.py": BENCH,
    "python bench/tune_task.py --task skills --trials 30": BENCH,
    "python bench/tune_task.py --task new-facts --trials 30 --steps 150 --batch-size 32 --eval-every 25": BENCH,
    # docs/advise.md
    "tunelab advise --model tunelab-tiny --method lora r=16 --seq 128 --batch 32 --memory 1GiB": RUN,
    "python -c \"from transformers import LlamaConfig as C; C(hidden_size=4096, intermediate_size=11008, "
    "num_hidden_layers=32, num_attention_heads=32, vocab_size=32000).save_pretrained('llama-2-7b')\"": RUN,
    "tunelab advise --model llama-2-7b/config.json --method qlora r=16 model.dtype=bfloat16 --seq 2048 --batch 4 "
    "--gradient-checkpointing --memory 24GiB --device rtx4090": RUN,
    "tunelab advise --model tunelab-tiny --objective dpo --seq 256 --batch 16 --memory 300MiB": RUN,
    "tunelab advise --model tunelab-tiny --method full --objective dpo --json": RUN,
    # docs/alignment.md
    "tunelab train configs/align-sft.yaml": RUN,
    "tunelab train configs/align-reward.yaml": RUN,
    "tunelab eval runs/align-reward --task tinyworld:prefs@test --json": RUN,
    "tunelab score runs/align-reward --data tinyworld:prefs@rankings-test --limit 5": RUN,
    "tunelab train configs/align-ppo.yaml": RUN,
    "tunelab train configs/align-ppo.yaml objective.reward=contains_answer objective.reward_model=null "
    "output.dir=runs/align-ppo-answer": RUN,
    "tunelab train configs/align-dpo.yaml": RUN,
    "tunelab train configs/align-dpo.yaml method.name=qlora output.dir=runs/align-dpo-qlora": RUN,
    "tunelab train configs/align-simpo.yaml": RUN,
    "tunelab train configs/align-orpo.yaml": RUN,
    "tunelab train configs/align-kto.yaml": RUN,
    "tunelab eval runs/align-kto --task tinyworld:prefs@test --json": RUN,
    "tunelab train configs/sft-lora.yaml": RUN,
    "tunelab train configs/distill.yaml": RUN,
    # docs/config.md
    'tunelab train configs/sft-lora.yaml train.max_steps=200 train.lr=1e-3 output.dir=runs/a '
    '"method.target_modules=[q_proj,v_proj]"': RUN,
    # docs/data.md
    "tunelab data check sft-lora": RUN,
    "tunelab data check configs/sft-lora.yaml --json": RUN,
    # docs/training.md
    "tunelab train configs/sft-lora.yaml output.dir=runs/a --resume": RUN,
    # docs/tune.md
    "tunelab tune sft-lora --space tune-lora --trials 30 --out runs/tune-lora": RUN,
    "tunelab train runs/tune-lora/best.yaml": RUN,
    "tunelab tune sft-lora --space lr-grid --sampler grid --trials 5 --pruner none "
    "--metric tinyworld:qa@validation:exact_match --out runs/lr-grid": RUN,
    "tunelab tune sft-lora --space tune-lora --trials 30 --out runs/tune-a --storage sqlite:///runs/study.db "
    "--study s &": "a worker started in the background (shell job control) beside a second one",
    "tunelab tune sft-lora --space tune-lora --trials 30 --out runs/tune-b --storage sqlite:///runs/study.db "
    "--study s &": "a worker started in the background (shell job control) beside a second one",
    "wait": "shell job control: waits for the background workers",
    # docs/compare.md
    "tunelab compare my-compare.yaml --out runs/cmp": COMPARE,
    "tunelab compare my-compare.yaml --out runs/cmp --workers 2": COMPARE,
    "tunelab compare --suite tinyworld --out runs/suite --variants zero-shot,lora,full --tasks qa": COMPARE,
    "tunelab compare my-compare.yaml --out runs/cmp --report-only": COMPARE,
    # docs/tinyworld.md
    "tunelab world tasks --out tasks/": RUN,
    'pip install torch==2.13.0 "lm-eval[hf]"': NETWORK,
    "tunelab export RUN --merge --out merged/": RUN,
    "lm_eval --model hf --model_args pretrained=merged,dtype=float32 --tasks tinyworld_qa --include_path docs/lm-eval "
    "--apply_chat_template --batch_size 32 --device cpu": "lm-evaluation-harness is not a tunelab dependency: it "
    "runs in a virtual environment of its own (the measurement is in docs/tinyworld.md)",
    "tunelab eval RUN_OR_MODEL --task tinyworld:qa@test --json": RUN,
    "tunelab eval RUN --task tinyworld:probe --forgetting --json": RUN,
    "tunelab eval RUN_OR_MODEL --data my_eval.jsonl --json": RUN,
    "tunelab world build-base --out DIR": "17 minutes of pretraining; tests/test_world_base.py builds a tiny one",
    # docs/methods/
    'tunelab methods --model PATH_OR_ID --method lora "method.target_modules=[q_proj,v_proj]" --json': RUN,
    "tunelab train configs/adapters-houlsby.yaml": RUN,
    "tunelab train configs/adapters-pfeiffer.yaml": RUN,
    "tunelab train configs/adapters-houlsby.yaml method.reduction_factor=8 method.nonlinearity=gelu "
    "output.dir=runs/adapters-r8": RUN,
    "tunelab eval runs/adapters-houlsby --task tinyworld:qa@test": RUN,
    "tunelab train configs/sft-full.yaml": RUN,
    "tunelab train configs/partial.yaml": RUN,
    'tunelab train configs/partial.yaml method.last_k=1 "method.regex=embed_tokens" output.dir=runs/partial-k1': RUN,
    "tunelab export runs/partial --out runs/partial-merged --merge": RUN,
    "tunelab train configs/bitfit.yaml": RUN,
    "tunelab eval runs/bitfit --task tinyworld:qa@test": RUN,
    "tunelab train configs/head-sentiment.yaml": RUN,
    "tunelab train configs/features-sentiment.yaml": RUN,
    "tunelab eval runs/head-sentiment --task tinyworld:sentiment@test --json": RUN,
    "tunelab eval tunelab-tiny --task tinyworld:sentiment@test --json": RUN,
    "tunelab train configs/krona.yaml": RUN,
    "tunelab export runs/dylora --out runs/dylora-r4-merged --merge --rank 4": RUN,
    "tunelab export runs/krona --out runs/krona-merged --merge": RUN,
    "tunelab train configs/dylora.yaml": RUN,
    "tunelab train configs/dylora.yaml method.eval_rank=4 output.dir=runs/dylora-r4": RUN,
    "tunelab methods --model tunelab-tiny --method krona": RUN,
    "tunelab train configs/qlora.yaml": RUN,
    "tunelab eval runs/qlora --task tinyworld:qa@test --forgetting": RUN,
    'python -c "\nfrom torch import nn; from tunelab.runconfig import build_config; '
    "from tunelab.methods.qlora import quantize_, bytes_per_param\nm = quantize_(nn.Sequential(nn.Linear(4096, 4096), "
    "nn.Linear(4096, 11008)), build_config({'method': 'qlora'}).method)\nprint(bytes_per_param(m))\"": RUN,
    "tunelab train configs/adalora.yaml": RUN,
    "tunelab train configs/adalora.yaml train.max_steps=600 method.total_step=600 output.dir=runs/adalora-600": RUN,
    "tunelab train configs/prefix.yaml": RUN,
    "tunelab train configs/prompt-tuning.yaml": RUN,
    "tunelab train configs/ptuning.yaml": RUN,
    'tunelab generate runs/prompt-tuning --prompt "Where does NAME live?"': RUN,
    "tunelab train configs/dora.yaml": RUN,
    "tunelab train configs/dora.yaml method.config.r=8 output.dir=runs/dora-r8": RUN,
    "tunelab train configs/ltsft.yaml": RUN,
    "tunelab train configs/diff-pruning.yaml": RUN,
    "tunelab train configs/threshold-mask.yaml": RUN,
    "tunelab eval runs/ltsft --task tinyworld:qa@test --forgetting": RUN,
    "tunelab export runs/ltsft --out runs/ltsft-merged --merge": RUN,
    "tunelab methods --model tunelab-tiny --method diff_pruning": RUN,
    # docs/rag.md
    "tunelab rag index --docs tasks/new-facts/knowledge.txt --per-line --out runs/rag": RUN,
    'tunelab rag query runs/rag "Which instrument does Hilde Moretti play?" --k 3': RUN,
    "tunelab rag index --docs tasks/new-facts/knowledge.jsonl --out runs/rag --add": RUN,
    "tunelab rag index --docs tasks/new-facts/knowledge.txt --per-line --out runs/rag-dense --dense": RUN,
    'tunelab rag query runs/rag-dense "What is the hobby of Hilde Moretti?" --retriever hybrid --json': RUN,
    # README: adapting without training
    'tunelab rag query runs/kb "Which hobby does Agnes Dietrich have?"': RUN,
    "tunelab eval tunelab-tiny --task tinyworld:new-facts@test --rag runs/kb --icl-k 4": RUN,
    "python bench/nonparametric.py": BENCH,
    # docs/results/gpu.md
    "python bench/gpu.py --cases lora-8b --json docs/results/gpu-lora-8b.json": GPU_BENCH,
    "python bench/gpu.py --cases qlora-8b --json docs/results/gpu-qlora-8b.json": GPU_BENCH,
    "python bench/gpu.py --cases full-3b --json docs/results/gpu-full-3b.json": GPU_BENCH,
    "python bench/gpu.py --toy": "minutes of CPU (a process per row, compiling the fast rows); tests/test_bench_gpu.py "
    "runs it at toy size and checks every row",
    # docs/training.md
    "tunelab train configs/sft-lora.yaml --nproc 2": "starts 2 processes under torchrun: tests/test_distributed.py "
    "runs --nproc 2 on a tiny model and compares it with one process",
    "torchrun --nproc-per-node 2 -m tunelab train configs/sft-lora.yaml": "the same run, launched by torchrun "
    "itself (tests/test_distributed.py)",
    "tunelab train configs/sft-lora.yaml --nproc 2 train.distributed=fsdp": "starts 2 processes under torchrun, "
    "FSDP2: tests/test_distributed.py runs it on a tiny model and compares it with one process",
    'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': "Slurm: inside an sbatch allocation "
    "on several machines",
    'srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 8 --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d '
    '--rdzv-endpoint "$HEAD:29500" -m tunelab train configs/sft-lora.yaml train.distributed=fsdp '
    'output.dir=/shared/runs/a': "Slurm: several machines with 8 GPUs each (no multi-node test here)",
    "tunelab train configs/sft-lora.yaml --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 --nproc 8":
    "two machines with 8 GPUs each; tests/test_distributed.py runs it as a dry run on 127.0.0.1",
    "tunelab train configs/sft-lora.yaml --nnodes 2 --node-rank 1 --master 10.0.0.1:29500 --nproc 8":
    "the second machine of the same run",
    # docs/methods/lst.md
    "tunelab train configs/lst.yaml": RUN,
    "tunelab eval runs/lst --task tinyworld:skills@counting-test": RUN,
    "python bench/lst_memory.py": "loads the real embedded base in a subprocess; its numbers are published in "
    "docs/results/lst-memory.json and docs/results/methods.md",
    # docs/methods/mpt.md
    "tunelab train configs/mpt.yaml": RUN,
    "tunelab train configs/mpt-target.yaml": RUN,
    "tunelab eval runs/mpt-target --task tinyworld:skills@counting-test": RUN,
    # docs/methods/pasta.md
    "tunelab train configs/pasta.yaml": RUN,
    "tunelab eval runs/pasta --task tinyworld:skills@counting-test": RUN,
    # docs/meta.md
    "tunelab meta configs/meta-lora.yaml --out runs/meta": META,
    "tunelab meta-eval runs/meta": META,
    "tunelab meta-eval base --config configs/meta-lora.yaml": META,
    # docs/rl.md
    "tunelab train configs/rl-grpo.yaml": RUN,
    "tunelab train configs/rl-grpo.yaml objective.loss_type=dr_grpo output.dir=runs/rl-dr-grpo": RUN,
    "tunelab train configs/rl-grpo.yaml objective.loss_type=dapo objective.epsilon_high=0.28 output.dir=runs/rl-dapo":
        RUN,
    "tunelab train configs/rl-rloo.yaml": RUN,
    # docs/regimes.md
    "tunelab train configs/multitask-skills.yaml": RUN,
    "tunelab data check configs/multitask-skills.yaml": RUN,
    "tunelab continual configs/continual-skills.yaml --out runs/continual": RUN,
    "tunelab continual configs/continual-skills.yaml --out runs/continual-replay continual.strategy=replay": RUN,
    "tunelab continual configs/continual-skills.yaml --out runs/continual --resume": RUN,
    # docs/serve.md
    "tunelab serve runs/sft-lora --adapter other=runs/other-lora --port 8000": SERVER,
    "curl -s localhost:8000/v1/models": SERVER,
    "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"sft-lora\", "
    "\"messages\": [{\"role\": \"user\", \"content\": \"Where does Ada Quinn live?\"}]}'": SERVER,
    # docs/ui.md
    "tunelab ui": UI,
    "tunelab ui --runs runs --runs experiments --port 8600": UI,
    "tunelab ui --model tunelab-tiny --adapter lora=runs/sft-lora --adapter dora=runs/sft-dora": UI,
    "TUNELAB_UI_SHOTS=docs/ui .venv/bin/python -m pytest -q tests/test_ui.py -k chromium": UI_SHOTS,
    # docs/export.md
    "tunelab train configs/sft-lora.yaml output.dir=runs/sft-lora": RUN,
    "tunelab export runs/sft-lora --out exports/sft-lora-gguf --gguf q8_0 --ollama": GGUF,
    "llama-cli -m exports/sft-lora-gguf/model.q8_0.gguf -cnv": GGUF_ELSEWHERE,
    "ollama create tunelab-sft -f exports/sft-lora-gguf/Modelfile": GGUF_ELSEWHERE,
    "python -c \"from llama_cpp import Llama; print(Llama('exports/sft-lora-gguf/model.q8_0.gguf')"
    ".create_chat_completion([{'role': 'user', 'content': 'Where does Ada live?'}]))\"": GGUF_ELSEWHERE,
    # docs/nonparametric.md
    "tunelab eval tunelab-tiny --task tinyworld:new-facts@paraphrases --icl-k 8 --icl select=similar": RUN,
    "tunelab rag index --docs tinyworld:new-facts@knowledge --out runs/kb": RUN,
    "tunelab eval tunelab-tiny --task tinyworld:new-facts@test --rag runs/kb --rag-set k=3": RUN,
    'tunelab generate tunelab-tiny --prompt "Which hobby does Agnes Dietrich have?" --rag runs/kb': RUN,
    "tunelab train sft-lora data.train=tinyworld:new-facts data.eval=null rag.index=runs/kb rag.train=true "
    "output.dir=runs/rag-lora": RUN,
    "tunelab eval runs/rag-lora --task tinyworld:new-facts@test": RUN,
    "tunelab train sft-full data.train=tinyworld:new-facts@retrieval data.eval=null objective.name=contrastive "
    "train.batch_size=32 output.dir=runs/retriever": RUN,
    "tunelab rag index --docs tinyworld:new-facts@knowledge --out runs/kb-ft --dense "
    "--encoder runs/retriever/final": RUN,
    "tunelab eval tunelab-tiny --task tinyworld:new-facts@test --rag runs/kb-ft --rag-set retriever=dense": RUN,
    "python bench/rag_scale.py --sizes 1000,10000,100000": BENCH,
    "python bench/rag_scale.py --sizes 1000000 --base-max 0 --json docs/results/rag-scale-1m.json": BENCH,
    "python bench/rag_scale.py --sizes 100000 --base-max 0 --ef-search 64,128,256,512,1024": BENCH,
}

# The rewrites (module docstring).
# RUN_OR_MODEL: a run, the one kind every such line accepts (a model that is not a run also needs
# --base for --forgetting); ASSUMED makes it.
PLACEHOLDERS = {"RUN_OR_MODEL": "runs/a", "RUN": "runs/a", "PATH_OR_ID": "tunelab-tiny"}
TRAIN_OVERRIDES = ["train.max_steps=2", "train.batch_size=2"]
LIMIT = ["--limit", "4"]
TUNE_TRIALS = ["--trials", "2"]
TINYWORLD_RECORDS = 32
# What a doc's commands presume exists: README's score line names the reward model docs/alignment.md
# trains; docs/training.md's resume lines continue a run it does not start; RUN_OR_MODEL.
ASSUMED = {
    "README.md": ["tunelab train configs/align-sft.yaml", "tunelab train configs/align-reward.yaml"],
    "docs/training.md": ["tunelab train configs/sft-lora.yaml output.dir=runs/a"],
    "docs/tinyworld.md": ["tunelab train configs/sft-lora.yaml output.dir=runs/a"],
}


# ---------------------------------------------------------------------------- extraction

def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(label, body) of every fenced code block."""
    blocks, label, body, fence = [], None, [], None
    for line in text.splitlines():
        m = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and m:
            fence, label, body = m.group(1), m.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
            blocks.append((label, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    return blocks


def split_commands(body: str) -> list[str]:
    """The commands of a shell block: comments dropped, continuations and open quotes joined."""
    commands, cur, quote, comment, i = [], "", None, False, 0
    while i < len(body):
        c, nxt = body[i], body[i + 1:i + 2]
        if comment and c != "\n":
            pass
        elif quote is not None:
            cur += c
            if c == "\\" and quote == '"':
                cur, i = cur + nxt, i + 1
            elif c == quote:
                quote = None
        elif c == "\\" and nxt == "\n":  # a continuation: one space, the next line's indent dropped
            cur, i = cur.rstrip() + " ", i + 1
            while body[i + 1:i + 2] in (" ", "\t"):
                i += 1
        elif c == "\\":
            cur, i = cur + c + nxt, i + 1
        elif c in "'\"":
            cur, quote = cur + c, c
        elif c == "#" and (not cur or cur[-1].isspace()):
            comment = True
        elif c == "\n":
            comment = False
            if cur.strip():
                commands.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        commands.append(cur.strip())
    return commands


def block_commands(label: str, body: str) -> list[str]:
    """The commands of one fenced block (module docstring: what counts)."""
    if label == "console":  # `$ ` lines are commands (with their continuations); the rest is output
        kept, cont = [], False
        for line in body.splitlines():
            if line.startswith("$ ") or cont:
                kept.append(line if cont else line[2:])
                cont = line.rstrip().endswith("\\")
        return split_commands("\n".join(kept))
    if label in SHELL_LABELS or (label == "" and any(PROGRAM.match(line) for line in body.splitlines())):
        return split_commands(body)
    return []


def doc_commands() -> dict[str, list[str]]:
    """Every doc's commands in document order, keyed by its path relative to the repo."""
    out = {}
    for doc in DOCS:
        blocks = fenced_blocks(doc.read_text(encoding="utf-8"))
        cmds = [c for label, body in blocks for c in block_commands(label, body)]
        if cmds:
            out[doc.relative_to(ROOT).as_posix()] = cmds
    return out


# ---------------------------------------------------------------------------- running

def rules(argv: list[str]) -> list[str]:
    """The only changes made to a doc command before it runs (module docstring)."""
    argv = [PLACEHOLDERS.get(a, a) for a in argv]
    if argv[:3] == ["python", "-m", "tunelab"]:
        argv = ["tunelab", *argv[3:]]
    if argv[:2] in (["tunelab", "train"], ["tunelab", "tune"]):
        argv = [*argv, *TRAIN_OVERRIDES]
    if argv[:2] == ["tunelab", "tune"]:
        argv = [*argv, *TUNE_TRIALS]
    if argv[:2] == ["tunelab", "continual"]:
        argv = [*argv, *TRAIN_OVERRIDES, "continual.eval_limit=4"]
    if argv[:2] in (["tunelab", "eval"], ["tunelab", "score"]) and "--limit" not in argv:
        argv = [*argv, *LIMIT]
    return argv


def write_missing_data(argv: list[str]) -> None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--data" and not value.startswith("tinyworld:") and not Path(value).exists():
            tiny.write_jsonl(Path(value), tiny.chat_records(8))


def run_command(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and output (stdout + stderr) of one command run in the current folder."""
    if argv[0] == "python":
        p = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr
    assert argv[0] == "tunelab", f"no way to run {argv[0]!r} here: mark the command in COMMANDS with why"
    from accelerate.state import AcceleratorState

    from tunelab.cli import main

    # A shell starts each command in a new process; accelerate keeps one state per process, which
    # refuses a second run's other mixed precision (bf16 configs, then fp32 ones).
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    try:
        main(argv[1:])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        code, tb = 1, traceback.format_exc()
        out = capsys.readouterr()
        return code, out.out + out.err + tb
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> Path:
    """An `assets/` folder whose `tiny-base` is the tiny random model `tunelab-tiny` stands for."""
    from transformers import AutoModelForCausalLM

    assets = tmp_path_factory.mktemp("assets")
    tok = tiny.tokenizer()
    model = AutoModelForCausalLM.from_config(tiny.config("llama", len(tok), num_hidden_layers=4,
                                                         max_position_embeddings=1024))
    model.save_pretrained(str(assets / "tiny-base"))
    tok.save_pretrained(str(assets / "tiny-base"))
    return assets


@pytest.fixture(scope="module")
def tinyworld_cache(tmp_path_factory) -> Path:
    """A $TUNELAB_CACHE whose TinyWorld task files hold their first TINYWORLD_RECORDS records."""
    from tunelab.data.sources import resolve_source

    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_CACHE", str(cache))
        suite = Path(resolve_source("tinyworld:qa")).parents[1]
    for f in suite.rglob("*.jsonl"):
        with f.open(encoding="utf-8") as lines:
            head = list(itertools.islice(lines, TINYWORLD_RECORDS))
        f.write_text("".join(head), encoding="utf-8")
    return cache


@pytest.fixture
def process_state():
    """One torch thread (ops on 32-wide matrices gain nothing from a second one, and lose much when
    the cores are busy); accelerate's per-process state is left as the test found none, so that the
    tests after this file do not meet a bf16 state they cannot change."""
    import torch
    from accelerate.state import AcceleratorState

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------- tests

def test_every_doc_command_is_classified():
    found = {c for cmds in doc_commands().values() for c in cmds}
    new = sorted(found - COMMANDS.keys())
    stale = sorted(COMMANDS.keys() - found)
    assert not new, ("commands in the docs that COMMANDS does not classify; add each to COMMANDS in "
                     f"tests/test_docs_commands.py as RUN or with why it cannot run here: {new}")
    assert not stale, f"COMMANDS entries no doc holds any more (remove them, or fix the doc): {stale}"


def test_extraction():
    body = ('tunelab train a.yaml x=1 \\\n   "y=[a,b]"   # why\n# a comment line\n'
            'tunelab generate r --prompt "a # b"  # c\npython -c "\nprint(1)  # two\n"')
    assert split_commands(body) == ['tunelab train a.yaml x=1 "y=[a,b]"', 'tunelab generate r --prompt "a # b"',
                                    'python -c "\nprint(1)  # two\n"']
    assert block_commands("", "runs/a/config.yaml   the resolved config") == []
    assert block_commands("", "step 130/200: loss 0.0003") == []
    assert block_commands("console", "$ tunelab methods\nlora  ...\n$ tunelab eval r \\\n  --json") == [
        "tunelab methods", "tunelab eval r --json"]
    assert block_commands("python", "import tunelab") == []


RUNNABLE = {doc: cmds for doc, cmds in doc_commands().items() if any(COMMANDS.get(c) == RUN for c in cmds)}


@pytest.mark.parametrize("doc", sorted(RUNNABLE))
def test_doc_commands_run(doc, tmp_path, monkeypatch, capsys, tiny_assets, tinyworld_cache, process_state):
    from tunelab.modeling import load

    monkeypatch.setattr(load, "ASSETS", tiny_assets)
    monkeypatch.setenv("TUNELAB_CACHE", str(tinyworld_cache))
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        monkeypatch.setenv(var, value)  # as tunelab.cli.main sets them, but restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for command in ASSUMED.get(doc, []) + [c for c in RUNNABLE[doc] if COMMANDS.get(c) == RUN]:
        argv = rules(shlex.split(command))
        write_missing_data(argv)
        code, out = run_command(argv, capsys)
        tail = "\n".join(out.splitlines()[-40:])
        assert code == 0 and "Traceback (most recent call last)" not in out, (
            f"{doc}: `{command}` failed (exit {code}); ran as {shlex.join(argv)} in {tmp_path}. Fix the doc or "
            f"the code; a command that cannot run here is marked in COMMANDS with why.\n{tail}")
