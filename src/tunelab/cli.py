"""The `tunelab` command line: parse, call `tunelab.api`, print. User errors print one or two
lines with the fix and exit non-zero (2 for bad input); no traceback."""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import typer

from tunelab.errors import EXIT_USER_ERROR, TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt causal language models with any fine-tuning technique and compare them.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="overrides as section.key=value, e.g. train.max_steps=200")
# The only grants of code execution and unpickling: this command's own flags (a run dir's or an
# artifact's settings never grant them; artifacts.untrusted).
TRUST_CODE = typer.Option(False, "--trust-remote-code", help="let the model folder's own Python code run (auto_map)")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="load .bin/.pt weights (unpickling can run code)")
# In-context learning and RAG (docs/nonparametric.md); more of their settings: `--icl key=value`.
ICL_K = typer.Option(0, "--icl-k", min=0, help="in-context learning: solved examples (shots) before each question")
ICL_SET = typer.Option(None, "--icl", help="an ICL setting, key=value (select=similar, pool=FILE, order=best_first, "
                       "format=text, max_length=N, seed=N); repeatable")
RAG_INDEX = typer.Option(None, "--rag", help="RAG: retrieve passages from this index (tunelab rag index)")
RAG_SET = typer.Option(None, "--rag-set", help="a RAG setting, key=value (k=5, retriever=hybrid, encoder=M, "
                       "template=..., max_length=N); repeatable")


def _techniques(icl_k: int, icl: list[str] | None, rag: str | None, rag_set: list[str] | None) -> dict[str, Any]:
    """The `icl` / `rag` keyword arguments of api.evaluate and api.generate from their options."""
    def pairs(items: list[str] | None, option: str) -> dict[str, str]:
        bad = [x for x in items or [] if "=" not in x]
        if bad:
            raise typer.BadParameter(f"{bad[0]!r}: write key=value", param_hint=option)
        return dict(x.split("=", 1) for x in items or [])
    icl_cfg = {**pairs(icl, "--icl"), **({"k": icl_k} if icl_k else {})}
    rag_cfg = {**pairs(rag_set, "--rag-set"), **({"index": rag} if rag else {})}
    if rag_cfg and "index" not in rag_cfg:
        raise typer.BadParameter("RAG settings need an index", param_hint="--rag")
    return {"icl": icl_cfg or None, "rag": rag_cfg or None}


def _quick_check(config: str, overrides: list[str]) -> None:
    """A missing or unreadable config, bad YAML, a bad override, an unknown key of the model, data, train or
    output section or an unknown method or objective name fails before torch is imported (a fraction of a
    second instead of several): the config layer needs only pydantic and YAML."""
    from pathlib import Path

    from tunelab.config import check_before_import, config_path, deep_merge, parse_overrides, read_yaml

    run = Path(config)
    path = run / "config.yaml" if run.is_dir() else config_path(config)
    check_before_import(deep_merge(read_yaml(path), parse_overrides(overrides)), str(path))


def config_path_of(config: str) -> str:
    """A config argument as a file path: itself, or the shipped config of that name."""
    from tunelab.config import config_path

    return str(config_path(config))


def _settings_line(st: dict) -> str:
    trained = "trained tokens only" if st["trained_tokens_only"] else "every token"
    return (f"data settings ({st['source']}): format {st['format']}, max_length {st['max_length']}, packing "
            f"{str(st['packing']).lower()}, chat template {st['chat_template']}, {trained}")


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, sort_keys=True))


def _launch(nproc: int, nnodes: int, node_rank: int, master: str | None, argv: list[str]) -> int:
    """`torchrun ... -m tunelab ARGV` in this process (torch's elastic launcher): on one machine a standalone
    rendezvous, on several a static one at --master. A process that fails is named in one line (rank, pid,
    exit code or signal) instead of torchrun's report; the exit code is 75 when every failed process
    stopped on a signal after its checkpoint, else 1."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nnodes > 1:
        host, _, port = (master or "").rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter(f"--nnodes {nnodes} needs HOST:PORT (node 0's address and a free port), "
                                     f"got {master!r}", param_hint="--master")
        if node_rank >= nnodes:
            raise typer.BadParameter(f"{node_rank} is not below --nnodes {nnodes}", param_hint="--node-rank")
        where = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", host, "--master-port", port]
    else:
        where = ["--standalone"]
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its warnings repeat what we say
    try:
        run(parse_args([*where, "--nproc-per-node", str(nproc), "-m", "tunelab", *argv]))
    except ChildFailedError as e:
        for rank, f in sorted(e.failures.items()):
            how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
            typer.echo(f"error: process rank {rank} (pid {f.pid}) {how}; the run stopped in every process", err=True)
        return 75 if all(f.exitcode == 75 for f in e.failures.values()) else 1
    except SignalException as e:  # the launcher itself was told to stop: its processes were told too
        typer.echo(f"stopped: the launcher got {e.sigval.name}; resume with --resume", err=True)
        return 75
    return 0


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML config, or a run directory (its config.yaml)"),
    overrides: list[str] = OVERRIDES,
    resume: bool = typer.Option(False, "--resume", help="continue from the newest complete checkpoint"),
    resume_from: str | None = typer.Option(None, "--resume-from", help="continue from this checkpoint (step-N), "
                                           "e.g. one before a divergence"),
    allow_changed: bool = typer.Option(False, "--allow-changed", help="resume even if config or data changed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over: delete the run tunelab wrote in "
                                   "output.dir first (only its own files)"),
    force: bool = typer.Option(False, "--force", help="write the run into a non-empty folder tunelab did not "
                               "make, beside its files (none is deleted)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    nproc: int = typer.Option(1, "--nproc", min=1, max=1024, help="processes on this machine, data parallel "
                              "(DDP; gloo on CPU), started by torchrun's launcher"),
    nnodes: int = typer.Option(1, "--nnodes", min=1, max=4096, help="machines in the run: run this command on each, "
                               "with its --node-rank and the same --master"),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="this machine's rank, 0..nnodes-1 (0 hosts --master)"),
    master: str | None = typer.Option(None, "--master", help="HOST:PORT of node 0, where the processes meet "
                                      "(with --nnodes > 1)"),
) -> None:
    """Train a model. Exit 0: every step applied; 75: stopped by a signal, checkpointed (--resume)."""
    _quick_check(config, overrides or [])
    if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:  # start the processes; each runs this again
        flags = [f for f, on in (("--resume", resume), ("--allow-changed", allow_changed), ("--overwrite", overwrite),
                                 ("--force", force), ("--quiet", quiet)) if on]
        flags += ["--resume-from", resume_from] if resume_from else []
        raise typer.Exit(_launch(nproc, nnodes, node_rank, master, ["train", config, *(overrides or []), *flags]))
    from tunelab import api

    result = api.train(config, overrides or [], resume=resume, allow_changed=allow_changed,
                       overwrite=overwrite, quiet=quiet, force=force, resume_from=resume_from)
    raise typer.Exit(result.exit_code)


@app.command()
def continual(
    config: str = typer.Argument(..., help="a continual config: a run config plus stages: and continual:"),
    overrides: list[str] = OVERRIDES,
    out: str = typer.Option(..., "--out", help="the folder of the stages' runs, continual.json and matrix.png"),
    resume: bool = typer.Option(False, "--resume", help="continue in the stage a stopped run was in"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over (only tunelab's own files are deleted)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Continual learning: train the stages in order (naive, replay, ewc, lwf, adapters), score every task
    after every stage; the accuracy matrix, ACC, BWT and FWT in OUT/continual.json (docs/regimes.md)."""
    from tunelab import api

    api.continual(config_path_of(config), overrides or [], out=out, resume=resume, overwrite=overwrite, quiet=quiet)


@app.command()
def meta(
    config: str = typer.Argument(..., help="a run config plus a `meta:` section (docs/meta.md)"),
    overrides: list[str] = OVERRIDES,
    out: str | None = typer.Option(None, "--out", help="default: runs/meta-<algorithm>"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over a meta run tunelab wrote there"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder tunelab did not make, beside "
                               "its files"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Meta-learning: MAML, first-order MAML or Reptile over a task family; writes OUT/init.safetensors."""
    from tunelab import api

    api.meta_train(config_path_of(config), overrides or [], out, quiet=quiet, overwrite=overwrite, force=force)


@app.command("meta-eval")
def meta_eval(
    init: str = typer.Argument(..., help="`base`, a `tunelab meta` folder, a run folder or a .safetensors file"),
    overrides: list[str] = OVERRIDES,
    config: str | None = typer.Option(None, "--config", help="the meta config (when INIT carries none)"),
    steps: list[int] = typer.Option(None, "--steps", min=1, help="adaptation steps to measure after (default: 1 5 "
                                    "20); repeatable"),
    tasks: str | None = typer.Option(None, "--tasks", help="the unseen tasks (default: the config's eval_tasks)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="the first N tasks only"),
    lr: float | None = typer.Option(None, "--lr"),
    optimizer: str | None = typer.Option(None, "--optimizer", help="sgd | adam"),
    seed: int | None = typer.Option(None, "--seed"),
    json_out: str | None = typer.Option(None, "--json", help="also write the result to this file"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Few-shot adaptation on unseen tasks: exact match and query loss after k steps from INIT."""
    from tunelab import api

    result = api.adapt_eval(init, config_path_of(config) if config else None, steps or None, overrides=overrides or [],
                            tasks=tasks, limit=limit, lr=lr, optimizer=optimizer, seed=seed, quiet=quiet)
    if json_out:
        from pathlib import Path

        Path(json_out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    typer.echo(api.adapt_table(result))


def _named_adapters(items: list[str] | None) -> dict[str, str]:
    """`--adapter NAME=RUN` options as {name: run}."""
    named = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"{item!r}: write NAME=RUN", param_hint="--adapter")
        named[name] = path
    return named


@app.command()
def serve(
    model: str = typer.Argument(..., help="run dir, adapter dir, model dir, hub id or tunelab-tiny"),
    adapters: list[str] = typer.Option(None, "--adapter", help="NAME=RUN: a peft adapter (LoRA-like run or adapter "
                                       "dir) over the same base, chosen per request by `model`; repeatable"),
    host: str = typer.Option("127.0.0.1", "--host", help="another address than loopback needs --token"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    token: str | None = typer.Option(None, "--token", envvar="TUNELAB_SERVE_TOKEN",
                                     help="every request must send `Authorization: Bearer TOKEN`"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions (streaming), /v1/models."""
    from tunelab import api

    named = _named_adapters(adapters)
    api.serve(model, named, host=host, port=port, token=token, trust_remote_code=trust_remote_code,
              allow_pickle=allow_pickle)


@app.command()
def ui(
    runs: list[str] = typer.Option(None, "--runs", help="a folder of run dirs, configs and compare reports the UI "
                                   "may read (default: runs); repeatable"),
    host: str = typer.Option("127.0.0.1", "--host", help="another address than loopback needs --token"),
    port: int = typer.Option(8500, "--port", min=1, max=65535),
    token: str | None = typer.Option(None, "--token", envvar="TUNELAB_SERVE_TOKEN",
                                     help="every request must carry it (log in at /login, or Authorization: Bearer)"),
    model: str | None = typer.Option(None, "--model", help="the chat pane's model: run dir, model dir, hub id or "
                                     "tunelab-tiny"),
    adapters: list[str] = typer.Option(None, "--adapter", help="NAME=RUN: a peft adapter over --model for the chat "
                                       "pane; repeatable"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """A local web UI: runs with live curves, compare reports, data check, start/stop training, chat."""
    from tunelab.ui import run_ui

    named = _named_adapters(adapters)
    run_ui(runs or ["runs"], host=host, port=port, token=token, model=model, adapters=named,
           trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, say=lambda line: typer.echo(line, err=True))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="run dir, model dir, adapter dir or hub id"),
    tasks: list[str] = typer.Option(
        None, "--task", help="tinyworld:<task>@<split> (split optional: test), tinyworld:probe, or a dataset file; "
        "repeatable",
    ),
    data: str | None = typer.Option(None, "--data", help="loss/perplexity on a dataset (jsonl/json/csv/parquet)"),
    forgetting: bool = typer.Option(False, "--forgetting", help="forgetting probe on the model and on its base"),
    base: str | None = typer.Option(None, "--base", help="base model for --forgetting (default: the run's or "
                                    "the adapter's own base)"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="evaluate the first N records of each task"),
    fmt: str | None = typer.Option(None, "--format", help="--data's format (default: the run's, else auto)"),
    max_length: int | None = typer.Option(None, "--max-length", min=2,
                                          help="--data's max_length (default: the run's, else 1024)"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="default: 8 for --data, 32 for tasks"),
    all_tokens: bool = typer.Option(False, "--all-tokens", help="score prompts too, not only assistant turns"),
    as_json: bool = typer.Option(False, "--json"),
    icl_k: int = ICL_K,
    icl: list[str] = ICL_SET,
    rag: str | None = RAG_INDEX,
    rag_set: list[str] = RAG_SET,
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Evaluate a model: task metrics (--task), the forgetting probe (--forgetting), loss and perplexity (--data).
    Tasks may be answered with in-context shots (--icl-k) or retrieved passages (--rag)."""
    from tunelab import api

    tasks = tasks or []
    m = api.evaluate(model, data, fmt=fmt, max_length=max_length, batch_size=batch_size, all_tokens=all_tokens,
                     tasks=tasks, forgetting=forgetting, base=base, limit=limit, trust_remote_code=trust_remote_code,
                     allow_pickle=allow_pickle, **_techniques(icl_k, icl, rag, rag_set))
    if as_json:
        _print_json(m)
    elif not tasks and not forgetting:
        typer.echo(f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  tokens {int(m['tokens'])}")
        typer.echo(_settings_line(m["data_settings"]))
    else:
        from rich.console import Console

        from tunelab.eval.tasks import results_table

        Console().print(results_table(m))


@app.command()
def generate(
    model: str = typer.Argument(..., help="run dir, model dir, adapter dir or hub id"),
    prompt: str = typer.Option(..., "--prompt"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy"),
    no_chat: bool = typer.Option(False, "--no-chat", help="continue the raw prompt, no chat template"),
    icl_k: int = ICL_K,
    icl: list[str] = ICL_SET,
    rag: str | None = RAG_INDEX,
    rag_set: list[str] = RAG_SET,
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Generate a reply (greedy by default), optionally after in-context shots (--icl-k, --icl pool=FILE) or
    retrieved passages (--rag INDEX)."""
    from tunelab import api

    typer.echo(api.generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                            chat=not no_chat, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                            **_techniques(icl_k, icl, rag, rag_set)))


@app.command()
def score(
    model: str = typer.Argument(..., help="reward model: run dir of objective reward, or a scalar-head model"),
    data: str = typer.Option(..., "--data", help='jsonl/json/csv/parquet of {"prompt", "response"}, '
                             '{"prompt", "chosen", "rejected"} or {"prompt", "responses": [best, ..., worst]}'),
    limit: int | None = typer.Option(None, "--limit", min=1, help="score the first N records"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json", help="one JSON object: records, pairs, accuracy"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Print a reward model's rewards for replies; ranked records also give pairwise accuracy."""
    from tunelab import api

    out = api.score(model, data, limit=limit, batch_size=batch_size, trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle)
    if as_json:
        _print_json(out)
        return
    for r in out["records"]:
        typer.echo(json.dumps(r, sort_keys=True))
    if out["accuracy"] is not None:
        typer.echo(f"pairwise accuracy {out['accuracy']:.3f} over {out['pairs']} pairs", err=True)


@app.command()
def export(
    run: str = typer.Argument(..., help="run dir (or adapter dir)"),
    out: str = typer.Option(..., "--out"),
    merge: bool = typer.Option(False, "--merge", help="merge the adapter into a plain transformers model"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder tunelab did not make, beside "
                               "its files (none is deleted or replaced)"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
    rank: int | None = typer.Option(None, "--rank", min=1, help="a DyLoRA run at rank k (1..r): merged at k, or "
                                    "a delta that loads at k"),
    gguf: str | None = typer.Option(None, "--gguf", help="also write the merged model as one GGUF file for "
                                    "llama.cpp / Ollama / LM Studio at this quant: f16, q8_0 or q4_k_m"),
    gguf_adapter: bool = typer.Option(False, "--gguf-adapter", help="a LoRA run: its adapter as a LoRA GGUF "
                                      "(adapter.gguf) beside the base as base.f16.gguf"),
    ollama: bool = typer.Option(False, "--ollama", help="with --gguf / --gguf-adapter: an Ollama Modelfile "
                                "(template and stop tokens)"),
    check: bool = typer.Option(True, "--check/--no-check", help="after a merge: merged vs adapter logits; after a "
                               "GGUF export: llama.cpp vs transformers on 50 held-out questions (README.md)"),
) -> None:
    """Export a trained model: its adapter, or merged into the base, or as GGUF for llama.cpp. A
    previous export in --out is replaced; a folder with other files is refused (see --force)."""
    from tunelab import api

    typer.echo(str(api.export(run, out, merge=merge, force=force, trust_remote_code=trust_remote_code,
                              allow_pickle=allow_pickle, rank=rank, gguf=gguf, gguf_adapter=gguf_adapter,
                              ollama=ollama, check=check)))


@data_app.command("check")
def data_check(
    config: str = typer.Argument(...), overrides: list[str] = OVERRIDES, as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Validate the config's datasets: report, token stats, one rendered example with its loss mask.
    Exit 2 when a run with this config would stop on its data."""
    _quick_check(config, overrides or [])
    from tunelab import api
    from tunelab.data.report import format_check_report

    report = api.data_check(config, overrides or [])
    typer.echo(json.dumps(report, indent=1, default=str) if as_json else format_check_report(report))
    if any(isinstance(v, dict) and v["validation"]["run_would_stop"] for v in report.values()):
        raise typer.Exit(EXIT_USER_ERROR)


world_app = typer.Typer(no_args_is_help=True, help="TinyWorld: the synthetic world, its task suite, the tiny base.")
app.add_typer(world_app, name="world")


@world_app.command("tasks")
def world_tasks(
    out: str = typer.Option(..., "--out", help="folder for <task>/<split>.jsonl and manifest.json"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write the TinyWorld task suite."""
    from tunelab.world import write_tasks

    manifest = write_tasks(out, seed)
    for name, task in manifest["tasks"].items():
        typer.echo(f"{name:<10} " + "  ".join(f"{split} {n}" for split, n in task["splits"].items()))
    typer.echo(f"wrote {out} (seed {seed}, {manifest['n_people']} people, version {manifest['version']})")


@world_app.command("build-base")
def world_build_base(
    out: str = typer.Option(..., "--out", help="model folder to write"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="pretraining steps (default: the recipe's)"),
    recipe: str | None = typer.Option(None, "--recipe", help="recipe YAML (default: configs/tunelab-tiny.yaml)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build from its last checkpoint"),
) -> None:
    """Pretrain the tiny base model on the TinyWorld corpus; prints its build stats as JSON."""
    from tunelab.recipes.build_base import build_base

    _print_json(build_base(out, recipe, steps=steps, resume=resume))


rag_app = typer.Typer(no_args_is_help=True, help="Retrieval (RAG): index documents, query the index.")
app.add_typer(rag_app, name="rag")


@rag_app.command("index")
def rag_index(
    docs: list[str] = typer.Option(..., "--docs", help=".txt/.md/.jsonl file or folder (repeatable)"),
    out: str = typer.Option(..., "--out", help="index folder (an index tunelab built there is replaced)"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="model whose tokenizer measures chunks "
                                         "(default tunelab-tiny; with --add: the index's)"),
    size: int | None = typer.Option(None, "--size", min=1, help="tokens per chunk (default 128)"),
    overlap: int | None = typer.Option(None, "--overlap", min=0, help="tokens consecutive chunks share (default 16)"),
    dense: bool = typer.Option(False, "--dense", help="also embed the chunks, for --retriever dense / hybrid"),
    encoder: str | None = typer.Option(None, "--encoder", help="with --dense: model folder, hub id, or base (the "
                                       "tokenizer's model, the default)"),
    dense_index: str = typer.Option("auto", "--dense-index", help="exact, hnsw, or auto (exact below 100k chunks)"),
    per_line: bool = typer.Option(False, "--per-line", help="each non-blank line of a .txt file is a document"),
    add: bool = typer.Option(False, "--add", help="add the documents to the index at --out"),
    as_json: bool = typer.Option(False, "--json"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Chunk documents and write a retrieval index (BM25; with --dense also vectors)."""
    from tunelab import api

    st = api.rag_index(docs, out, tokenizer=tokenizer, size=size, overlap=overlap, dense=dense, encoder=encoder,
                       per_line=per_line, add=add, dense_index=dense_index, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle, log=lambda line: typer.echo(line, err=True))
    if as_json:
        _print_json(st)
        return
    typer.echo(f"{st['index']}: {st['chunks']} chunks ({st['new_chunks']} new, {st['duplicates_dropped']} duplicates "
               f"dropped) from {st['documents']} documents, retrievers {', '.join(st['retrievers'])}, "
               f"{st['seconds']:.1f} s")


@rag_app.command("query")
def rag_query(
    index: str = typer.Argument(..., help="index folder (tunelab rag index)"),
    question: str = typer.Argument(...),
    k: int = typer.Option(5, "--k", min=1, help="chunks to return"),
    retriever: str = typer.Option("bm25", "--retriever", help="bm25, dense or hybrid (RRF of both)"),
    encoder: str | None = typer.Option(None, "--encoder", help="dense/hybrid: default the index's own"),
    as_json: bool = typer.Option(False, "--json"),
    trust_remote_code: bool = TRUST_CODE,
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """The chunks of an index that best match a question, best first."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from tunelab import api

    hits = api.rag_query(index, question, k=k, retriever=retriever, encoder=encoder,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if as_json:
        _print_json([asdict(h) for h in hits])
        return
    table = Table("rank", "score", "id")
    table.add_column("source", overflow="ellipsis", max_width=32)
    table.add_column("text", ratio=1)
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id, h.source, h.text)
    if hits:
        Console().print(table)
    else:
        typer.echo("no match")


@app.command()
def methods(
    model: str = typer.Option(None, "--model", help="model dir or hub id: count parameters on its config"),
    method: str = typer.Option(None, "--method", help="with --model: just this method"),
    overrides: list[str] = typer.Argument(None, help="method keys, e.g. method.r=4"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The registered methods, one line each; or one method's parameter count on a model."""
    from tunelab import api

    if method is not None:
        cost = api.method_cost(model or "tunelab-tiny", method, overrides or [])
        typer.echo(json.dumps(cost) if as_json else f"{cost['trainable']:,} trainable of {cost['total']:,}")
        return
    rows = api.methods(model or "tunelab-tiny")
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        merge = "mergeable" if r["mergeable"] else "-"
        n = f"{r['trainable']:,}" if r.get("trainable") is not None else "?"
        typer.echo(f"{r['name']:<15} {r['family']:<16} {r['backend']:<5} {merge:<10} {n:>10}  {r['paper']:<17} "
                   f"{r['summary']}")


@app.command()
def advise(
    model: str = typer.Option("tunelab-tiny", "--model", help="config.json, model folder, run dir or cached hub id"),
    method: str | None = typer.Option(None, "--method", help="the method (default: every method, to see which fit)"),
    overrides: list[str] = typer.Argument(None, help="method keys as key=value (r=16), other sections as "
                                          "section.key=value (objective.beta=0.1, model.dtype=bfloat16)"),
    objective: str | None = typer.Option(None, "--objective", help="the objective (default sft)"),
    seq: int | None = typer.Option(None, "--seq", min=1, help="tokens per sequence (default data.max_length, 512)"),
    batch: int | None = typer.Option(None, "--batch", min=1, help="sequences (dpo: pairs) per micro-batch (default 8)"),
    memory: str | None = typer.Option(None, "--memory", help="memory budget, e.g. 24GiB or 80GB: does it fit, "
                                      "the largest batch and sequence length that do"),
    checkpointing: bool | None = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                              help="default train.gradient_checkpointing (both are shown)"),
    device: str | None = typer.Option(None, "--device", help="cpu, t4, l4, rtx4090, a100, h100, h200: precision "
                                      "auto, paged optimizers and the time estimate follow it (default: this machine)"),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adamw, paged_adamw_8bit, paged_adamw_32bit "
                                         "(default: the method's)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Memory and time of a training run from the model's config alone (meta device, no download):
    weights, trainable parameters, gradients, optimizer states, activations, extra models, peak."""
    from rich.console import Console

    from tunelab import api
    from tunelab.recipes.advise_table import advise_table, methods_table

    r = api.advise(model, method, overrides or [], objective=objective, batch=batch, seq=seq, memory=memory,
                   checkpointing=checkpointing, device=device, optimizer=optimizer)
    if as_json:
        _print_json(r)
        return
    # piped into a file or a log: a fixed width wide enough for the table rather than rich's 80
    Console(width=None if sys.stdout.isatty() else 150).print(advise_table(r) if method is not None
                                                                else methods_table(r))
    for note in r.get("notes", []):
        typer.echo(f"note: {note}")


@app.command()
def compare(
    spec: str = typer.Argument(None, help="compare spec YAML (see docs/compare.md)"),
    suite: str | None = typer.Option(None, "--suite", help="a shipped suite instead of a spec: tinyworld"),
    out: str | None = typer.Option(None, "--out", help="output folder (default runs/compare-<spec name>)"),
    workers: int = typer.Option(1, "--workers", min=1, help="cells run at once, each in its own process"),
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the cell database; share one compare "
                                  "between machines with a postgresql:// URL (default sqlite in --out)"),
    report_only: bool = typer.Option(False, "--report-only", help="write the report from the cells done so far"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="run failed cells again"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder tunelab did not make"),
    variants: str | None = typer.Option(None, "--variants", help="only these variants (comma-separated)"),
    tasks: str | None = typer.Option(None, "--tasks", help="only these tasks (comma-separated)"),
) -> None:
    """Compare variants (methods, objectives, any config keys) x tasks x seeds: quality with 95 % CIs and
    paired tests, trainable parameters, peak memory, time, forgetting; report.md, results.csv/json, plots."""
    from tunelab.recipes.compare import SUITES
    from tunelab.recipes.compare import compare as run_compare

    if (spec is None) == (suite is None):
        raise TunelabError("give a spec file or --suite NAME (not both)", fix=f"suites: {', '.join(SUITES)}")
    if suite is not None and suite not in SUITES:
        raise TunelabError(f"unknown suite {suite!r}", fix=f"suites: {', '.join(SUITES)}")
    run_compare(spec or suite, out=out, workers=workers, db=db, report_only=report_only, retry_failed=retry_failed,
                force=force, variants=variants.split(",") if variants else None,
                tasks=tasks.split(",") if tasks else None, say=lambda line: typer.echo(line, err=True))


@app.command()
def tune(
    config: str = typer.Argument(..., help="base YAML config (or a run directory)"),
    overrides: list[str] = OVERRIDES,
    space: str = typer.Option(..., "--space", help="search space YAML: config key -> {type, low, high, log} or "
                              "{choices} (docs/tune.md)"),
    trials: int = typer.Option(..., "--trials", min=1, help="trials in the study in all, across its workers"),
    out: str | None = typer.Option(None, "--out", help="folder for the trials, study.db and the report "
                                   "(default: runs/<study>)"),
    storage: str | None = typer.Option(None, "--storage", help="Optuna database URL shared by workers (default: "
                                       "sqlite:///<out>/study.db)"),
    study: str | None = typer.Option(None, "--study", help="study name (default: tune-<config name>)"),
    pruner: str = typer.Option("median", "--pruner", help="median | asha | none: stops trials whose evals "
                               "(train.eval_every) trail the others"),
    metric: str = typer.Option("eval_loss", "--metric", help="eval_loss (the run's final, on data.eval) or "
                               "TASK:METRIC on a validation split, e.g. tinyworld:qa@validation:exact_match"),
    direction: str | None = typer.Option(None, "--direction", help="minimize | maximize (default: minimize "
                                         "losses and perplexities, maximize the rest)"),
    seed: int | None = typer.Option(None, "--seed", help="the sampler's seed (one worker: a reproducible search)"),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe | random | grid (each combination of a space of "
                                "choices once)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Search hyperparameters (Optuna TPE + pruning): best.yaml, trials.csv, report.md and plots in --out.
    Rerun to resume; start more workers with the same --storage and --study to share one study."""
    _quick_check(config, overrides or [])
    from tunelab import api

    result = api.tune(config, space, trials=trials, overrides=overrides or [], out=out, storage=storage,
                      study=study, pruner=pruner, metric=metric, direction=direction, seed=seed, quiet=quiet,
                      sampler=sampler)
    raise typer.Exit(result.exit_code)


@app.command()
def demo(out: str = typer.Option("runs/demo", "--out")) -> None:
    """The end-to-end demo: fine-tune, evaluate before/after, generate."""
    from tunelab.recipes.demo import run_demo

    run_demo(out)


def _quiet_libraries() -> None:
    """Library chatter (per-file progress bars, deprecation notes aimed at library authors) hides
    what tunelab says; keep errors."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional-kernel notice on every import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# Errors of the file system that come from what the user pointed at, not from tunelab: one line.
_USER_OS_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EISDIR,
                   errno.ENOTDIR, errno.ELOOP}


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
    except TunelabError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        typer.echo(f"error: {e.strerror}{where}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        kind = _click_kind(e)
        if kind == "ClickException":
            e.show()  # type: ignore[attr-defined]
            sys.exit(EXIT_USER_ERROR)
        if kind == "Abort":
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def _click_kind(e: BaseException) -> str | None:
    """"ClickException" / "Abort" for click's errors, whichever click raised them: typer >= 0.29
    ships its own copy (`typer._click`), whose classes are not `click`'s."""
    for cls in type(e).__mro__:
        if cls.__name__ in ("ClickException", "Abort") and cls.__module__.endswith("click.exceptions"):
            return cls.__name__
    return None
