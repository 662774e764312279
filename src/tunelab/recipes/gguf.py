"""GGUF export for llama.cpp, Ollama and LM Studio, made by llama.cpp's own tools and checked by
llama.cpp's own runtime.

- The converter is llama.cpp's `convert_hf_to_gguf.py` (and `convert_lora_to_gguf.py` for
  `--gguf-adapter`) from a pinned llama.cpp release, taken the way the ecosystem ships it: the copy
  vendored in the `llama-cpp-python` source distribution on PyPI (downloaded once by pip, its
  sha256 checked, cached under `$TUNELAB_CACHE/llama.cpp-<version>`), or a llama.cpp checkout
  named by `$TUNELAB_LLAMA_CPP`. It runs as a subprocess (recipes/gguf_convert.py).
- f16 and q8_0 come from the converter; q4_k_m from llama.cpp's quantizer (`llama_model_quantize`
  of llama-cpp-python, which is also the runtime of the check).
- The check (skippable): on held-out TinyWorld questions, llama.cpp's tokenization of each chat
  prompt vs transformers', and greedy replies of the GGUF file (llama.cpp) vs the exported
  transformers model, token by token, plus exact match of each. The result goes into the export's
  README and `gguf_check.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.data.qa import exact_match, prompt_and_gold
from tunelab.errors import TunelabError
from tunelab.inference.generation import encode_prompt, generate_ids, reply_lead, reply_text, stop_token_ids, until_stop
from tunelab.world.chat import IM_END, IM_START, render_chat
from tunelab.world.resolve import cache_root, resolve_task

LLAMA_CPP_PYTHON = "0.3.36"  # its sdist vendors llama.cpp; its gguf-py is gguf 0.19.0
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
QUANTS = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's llama_ftype
CHECK_TASK = "tinyworld:qa@test"
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
INSTALL_FIX = "pip install 'tunelab[gguf]' (llama-cpp-python builds from source: a C++ compiler and cmake)"


# ----------------------------------------------------------------------------- llama.cpp's converter


def llama_cpp_dir() -> Path:
    """The llama.cpp source folder whose converter runs: $TUNELAB_LLAMA_CPP, else the pinned copy."""
    env = os.environ.get("TUNELAB_LLAMA_CPP")
    if env:
        root = Path(env).expanduser()
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise TunelabError(f"TUNELAB_LLAMA_CPP={env}: no convert_hf_to_gguf.py there",
                               fix="point it at a llama.cpp checkout, or unset it to use the pinned copy")
        return root
    root = cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory(prefix="tunelab-llama-cpp-") as tmp:
        sdist = _download_sdist(Path(tmp))
        _check_sha(sdist)
        staged = Path(tmp) / "llama.cpp"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in KEEP]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staged, members=members, filter="data")
        root.parent.mkdir(parents=True, exist_ok=True)
        if not root.exists():
            shutil.move(str(staged), str(root))
    return root


def _download_sdist(where: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(where),
           f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    files = list(where.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not files:
        raise TunelabError(f"could not download llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON} sdist): "
                           f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['pip failed']}",
                           fix="connect to PyPI once, or set TUNELAB_LLAMA_CPP to a llama.cpp checkout")
    return files[0]


def _check_sha(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise TunelabError(f"{sdist.name}: sha256 {digest} is not the pinned {SDIST_SHA256}",
                           fix="check your package index; or set TUNELAB_LLAMA_CPP to a llama.cpp checkout")


def _run_converter(script: str, args: Sequence[str]) -> None:
    cmd = [sys.executable, "-m", "tunelab.recipes.gguf_convert", str(llama_cpp_dir()), script, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise TunelabError(f"llama.cpp's {script} failed:\n{tail}",
                           fix="see docs/export.md (supported architectures are llama.cpp's)")


def _gguf_ready_copy(model_dir: Path, where: Path) -> Path:
    """The model folder as the converter should see it: the chat template without transformers'
    `{% generation %}` markers (they add no text; llama.cpp's template engine does not know them)."""
    staged = where / "hf"
    shutil.copytree(model_dir, staged)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        f = staged / name
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            f.write_text(re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", text), encoding="utf-8")
    return staged


def convert(model_dir: str | Path, out_file: str | Path, quant: str = "f16") -> Path:
    """A transformers model folder → one GGUF file at `quant` (f16, q8_0, q4_k_m)."""
    if quant not in QUANTS:
        raise TunelabError(f"--quant {quant}: not one of {', '.join(QUANTS)}", fix=f"use one of {', '.join(QUANTS)}")
    out_file = Path(out_file)
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-", dir=out_file.parent.parent) as tmp:  # beside, not in
        staged = _gguf_ready_copy(Path(model_dir), Path(tmp))
        first = out_file if quant != "q4_k_m" else Path(tmp) / "f16.gguf"
        _run_converter("convert_hf_to_gguf.py", [str(staged), "--outfile", str(first),
                                                 "--outtype", "f16" if quant == "q4_k_m" else quant])
        if quant == "q4_k_m":
            quantize(first, out_file, LLAMA_FTYPE_MOSTLY_Q4_K_M)
    return out_file


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out_file: str | Path) -> Path:
    """A peft LoRA adapter → a LoRA GGUF that llama.cpp applies at load (`--lora`)."""
    _run_converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_file),
                                               "--outtype", "f16"])
    return Path(out_file)


def llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise TunelabError(f"llama.cpp's runtime is not installed ({e})", fix=INSTALL_FIX) from None
    return llama_cpp


def quantize(src: Path, dst: Path, ftype: int) -> None:
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise TunelabError(f"llama.cpp could not quantize {src.name} (ftype {ftype})",
                           fix="try --quant q8_0 (row sizes must be multiples of 256 for k-quants)")


# ----------------------------------------------------------------------------- the check


def check(gguf_file: str | Path, model_dir: str | Path, *, n: int = 50, max_new_tokens: int = 16,
          lora: str | Path | None = None, base_gguf: str | Path | None = None) -> dict[str, Any]:
    """llama.cpp vs transformers on `n` held-out TinyWorld questions (chat prompts): tokenization
    agreement, greedy agreement (same reply tokens up to the stop token) and the exact match of each.

    `model_dir` is the transformers model the GGUF was made from; with `lora`, the GGUF file is the
    base and `lora` the LoRA GGUF applied at load."""
    lib = llama_cpp()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    records = [json.loads(line) for line in resolve_task(CHECK_TASK).read_text(encoding="utf-8").splitlines()[:n]]
    prompts, golds = zip(*[prompt_and_gold(r)[:2] for r in records], strict=True)
    encoded = [encode_prompt(tok, p, chat=True) for p in prompts]
    stops = stop_token_ids(model, tok)
    hf_rows = [until_stop(r, stops) for r in generate_ids(model, tok, encoded, max_new_tokens=max_new_tokens)]
    llm = lib.Llama(model_path=str(base_gguf or gguf_file), lora_path=str(lora) if lora else None, n_ctx=512,
                    n_threads=max(1, (os.cpu_count() or 1)), verbose=False, seed=0, logits_all=True)
    same_tokens, worst, top5 = 0, 0.0, 0
    gg_rows = []
    with torch.no_grad():
        first = [model(input_ids=torch.tensor([ids])).logits[0, -1].numpy() for ids in encoded]  # (V,) each
    for ids, hf in zip(encoded, first, strict=True):
        text = tok.decode(ids)
        same_tokens += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        row, gg = _greedy_llama(llm, ids, stops, max_new_tokens)
        gg_rows.append(row)
        worst = max(worst, float(abs(gg - hf).max()))
        top5 += set(gg.argsort()[-5:]) == set(hf.argsort()[-5:])
    lead = reply_lead(tok)
    decode = lambda rows: [reply_text(tok, r, lead) for r in rows]  # noqa: E731
    hf_text, gg_text = decode(hf_rows), decode(gg_rows)
    k = len(records)
    return {
        "task": CHECK_TASK, "n": k, "gguf": Path(gguf_file).name, "lora": Path(lora).name if lora else None,
        "tokenization_agreement": same_tokens / k,
        # next-token logits after each prompt: the largest |llama.cpp - transformers|, and how often the
        # top 5 tokens are the same set (a check that holds even when a reply is one token long)
        "first_logits_max_abs_diff": worst, "first_top5_agreement": top5 / k,
        "greedy_agreement": sum(a == b for a, b in zip(hf_rows, gg_rows, strict=True)) / k,
        "exact_match_transformers": sum(map(exact_match, hf_text, golds)) / k,
        "exact_match_gguf": sum(map(exact_match, gg_text, golds)) / k,
        "examples": [{"prompt": p if isinstance(p, str) else p[-1]["content"], "transformers": a, "gguf": b}
                     for p, a, b in list(zip(prompts, hf_text, gg_text, strict=True))[:3]],
    }


def _greedy_llama(llm: Any, ids: list[int], stops: Sequence[int], max_new_tokens: int) -> tuple[list[int], Any]:
    """Greedy decoding by argmax of llama.cpp's logits (no sampler in between): the reply's ids and
    the next-token logits after the prompt."""
    llm.reset()
    llm.eval(ids)
    first = llm.scores[llm.n_tokens - 1].copy()
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out, first


def check_section(result: dict[str, Any]) -> str:
    """The check's lines for the export's README."""
    return (f"\n## llama.cpp check ({result['gguf']}{' + ' + result['lora'] if result['lora'] else ''})\n\n"
            f"On {result['n']} held-out questions of `{result['task']}`, llama.cpp (llama-cpp-python "
            f"{LLAMA_CPP_PYTHON}) vs transformers:\n\n"
            f"| tokenization agreement | greedy agreement | exact match (transformers) | exact match (GGUF) | "
            f"next-token logits max abs diff | same top 5 |\n|---|---|---|---|---|---|\n"
            f"| {result['tokenization_agreement']:.3f} | {result['greedy_agreement']:.3f} | "
            f"{result['exact_match_transformers']:.3f} | {result['exact_match_gguf']:.3f} | "
            f"{result['first_logits_max_abs_diff']:.3g} | {result['first_top5_agreement']:.3f} |\n")


# ----------------------------------------------------------------------------- Ollama


def modelfile(gguf_name: str, tokenizer: Any, *, adapter: str | None = None) -> str:
    """An Ollama Modelfile for a ChatML-family model (Qwen's template; tunelab-tiny's, which also starts
    every assistant reply with a space): the template in Ollama's Go syntax and the end-of-turn stop.
    Other templates are refused (say so, not guess)."""
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}]
    template = getattr(tokenizer, "chat_template", None)
    rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True) if template else None
    lead = reply_lead(tokenizer)
    if rendered != render_chat(probe, add_generation_prompt=True, lead=lead):
        raise TunelabError("--ollama: the model's chat template is not ChatML (<|im_start|>role ... <|im_end|>), the "
                           "one family tunelab translates to Ollama's template syntax",
                           fix="drop --ollama and write the Modelfile's TEMPLATE by hand (the GGUF carries the "
                               "jinja template as tokenizer.chat_template)")
    content = '{{ if eq .Role "assistant" }}' + lead + "{{ end }}{{ .Content }}" if lead else "{{ .Content }}"
    go = ("{{- range .Messages }}" + IM_START + "{{ .Role }}\n" + content + IM_END + "\n{{ end }}"
          + IM_START + "assistant\n")
    lines = [f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    lines += [f'TEMPLATE """{go}"""', f'PARAMETER stop "{IM_END}"', f'PARAMETER stop "{IM_START}"',
              "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
