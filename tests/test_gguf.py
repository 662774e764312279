"""GGUF export (recipes/gguf.py, gguf_export.py): llama.cpp's converter, the Ollama Modelfile, the checks.

The slow tests run llama.cpp's own converter and runtime (llama-cpp-python) on tunelab-tiny (GPT-2's
byte-level BPE) after a short LoRA SFT on TinyWorld QA: the exported GGUF must tokenize and answer
held-out questions as transformers does.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tunelab.errors import TunelabError
from tunelab.recipes import gguf as g
from tunelab.recipes.gguf_convert import pre_tokenizer_name
from tunelab.world.chat import CHAT_TEMPLATE, IM_END, IM_START

# ----------------------------------------------------------------------------- Ollama's Modelfile grammar
# https://github.com/ollama/ollama/blob/main/docs/modelfile.md: `INSTRUCTION arguments`, one per line;
# instructions FROM (required), PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE, MESSAGE, REQUIRES;
# a value may be a """multi-line""" string; `#` starts a comment line.
INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
PARAMETERS = {"num_ctx", "repeat_last_n", "repeat_penalty", "temperature", "seed", "stop", "num_predict", "top_k",
              "top_p", "min_p"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    out, i = [], 0
    lines = text.split("\n")
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"([A-Za-z]+)\s+(.*)$", line)
        assert m, f"not an instruction: {line!r}"
        inst, arg = m.group(1).upper(), m.group(2)
        assert inst in INSTRUCTIONS, inst
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                assert i < len(lines), "unterminated triple-quoted value"
                body += "\n" + lines[i]
                i += 1
            assert body.endswith('"""'), f"text after a closing triple quote: {body!r}"
            arg = body[:-3]
        elif inst == "PARAMETER":
            name, value = arg.split(None, 1)
            assert name in PARAMETERS, name
            arg = f"{name} {shlex.split(value)[0]}"
        out.append((inst, arg))
    assert out and out[0][0] == "FROM", "a Modelfile starts with FROM"
    return out


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Ollama's Go template for the constructs a tunelab Modelfile uses: `{{- range .Messages }}...{{ end }}`,
    `{{ .Role }}`, `{{ .Content }}` and `{{ if eq .Role "..." }}...{{ end }}` inside the range."""
    m = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}((?:(?!\{\{).)*)", template, re.S)
    assert m, template
    body, tail = m.groups()

    def one(msg: dict[str, str]) -> str:
        text = re.sub(r'\{\{ if eq \.Role "(\w+)" \}\}(.*?)\{\{ end \}\}',
                      lambda c: c.group(2) if msg["role"] == c.group(1) else "", body, flags=re.S)
        assert "{{ if" not in text, text
        return text.replace("{{ .Role }}", msg["role"]).replace("{{ .Content }}", msg["content"])

    return "".join(map(one, messages)) + tail


def test_modelfile_parses_and_carries_template_and_stops(tok):
    text = g.modelfile("model.q8_0.gguf", tok)
    parsed = parse_modelfile(text)
    assert parsed[0] == ("FROM", "./model.q8_0.gguf")
    assert ("PARAMETER", f"stop {IM_END}") in parsed
    template = dict(parsed)["TEMPLATE"]
    assert template.endswith(f"{IM_START}assistant\n")
    # the Go template renders a conversation (assistant replies' leading space included) as the jinja one does
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Madrid"}, {"role": "user", "content": "and you?"}]
    for msgs in (messages, messages[1:2]):
        assert render_go(template, msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert " Madrid" in render_go(template, messages)
    adapter = parse_modelfile(g.modelfile("base.f16.gguf", tok, adapter="adapter.gguf"))
    assert ("ADAPTER", "./adapter.gguf") in adapter


def test_modelfile_of_plain_chatml(tok):
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    plain.chat_template = CHAT_TEMPLATE.replace("' ' + message['content']", "message['content']")
    template = dict(parse_modelfile(g.modelfile("m.gguf", plain)))["TEMPLATE"]
    assert "{{ if" not in template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Madrid"},
                {"role": "user", "content": "ok"}]
    assert render_go(template, messages) == plain.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


def test_modelfile_refuses_a_template_it_cannot_translate(tok):
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TunelabError, match="not ChatML"):
        g.modelfile("m.gguf", other)


def test_the_modelfile_parser_rejects_bad_files():
    for bad in ['PARAMETER stop "x"\n', 'FROM ./m.gguf\nTEMPLATE """open\n', "FROM ./m\nBOGUS x\n"]:
        with pytest.raises(AssertionError):
            parse_modelfile(bad)


# ----------------------------------------------------------------------------- the converter wrapper


def test_pre_tokenizer_is_recognised_structurally(tmp_path, llama_dir):
    assert pre_tokenizer_name(llama_dir / "tokenizer.json") == "gpt-2"  # modeling/bpe.py's tokenizer
    # tunelab-tiny's first tokenizer (newline split + a prefix space) is not GPT-2's: still refused
    spec = json.loads((llama_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\n+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert pre_tokenizer_name(tmp_path / "tokenizer.json") is None
    assert pre_tokenizer_name(tmp_path / "missing.json") is None


def test_export_refuses_bad_gguf_options(tmp_path, llama_dir):
    from tunelab.recipes.export import export

    with pytest.raises(TunelabError, match="not one of"):
        export(llama_dir, tmp_path / "a", gguf="q5_x")
    with pytest.raises(TunelabError, match="Modelfile for a GGUF"):
        export(llama_dir, tmp_path / "b", ollama=True)
    with pytest.raises(TunelabError, match="pick one"):
        export(llama_dir, tmp_path / "c", gguf="f16", gguf_adapter=True)
    with pytest.raises(TunelabError, match="not a LoRA adapter"):
        export(llama_dir, tmp_path / "d", gguf_adapter=True)


# ----------------------------------------------------------------------------- end to end (llama.cpp)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """tunelab-tiny after a short LoRA SFT on TinyWorld QA (60 steps: replies change, answers stay mostly right)."""
    from tunelab.recipes.run import train

    root = tmp_path_factory.mktemp("gguf")
    train({"model": {"name_or_path": "tunelab-tiny"}, "data": {"train": "tinyworld:qa", "max_length": 128},
           "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
           "train": {"max_steps": 60, "batch_size": 16, "lr": 1e-3, "save_every": 0},
           "output": {"dir": str(root / "run")}}, quiet=True)
    return root / "run"


@pytest.mark.slow
def test_gguf_export_answers_as_transformers(tmp_path, tuned):
    from tunelab.recipes.export import export

    out = export(tuned, tmp_path / "f16", gguf="f16", ollama=True)
    report = json.loads((out / "export_check.json").read_text())
    assert report["merge"]["max_abs_logit_diff"] < 1e-4 and report["merge"]["argmax_agreement"] == 1.0
    check = report["gguf"]
    assert check["n"] >= 50
    assert all(e["transformers"] for e in check["examples"]), check["examples"]  # replies, not bare stops
    assert check["tokenization_agreement"] == 1.0
    assert check["first_logits_max_abs_diff"] < 0.05 and check["first_top5_agreement"] >= 0.95, check
    assert check["greedy_agreement"] >= 0.95, check
    assert abs(check["exact_match_gguf"] - check["exact_match_transformers"]) <= 0.05
    assert "llama.cpp check" in (out / "README.md").read_text()
    parsed = dict(parse_modelfile((out / "Modelfile").read_text()))
    assert parsed["FROM"] == "./model.f16.gguf"
    q8 = export(tuned, tmp_path / "q8", gguf="q8_0")
    q8_check = json.loads((q8 / "export_check.json").read_text())["gguf"]
    assert q8_check["tokenization_agreement"] == 1.0
    assert q8_check["greedy_agreement"] >= 0.8, q8_check  # reported in docs/export.md; quantization moves some


@pytest.mark.slow
def test_gguf_adapter_applies_in_llama_cpp(tmp_path, tuned):
    from tunelab.recipes.export import export

    out = export(tuned, tmp_path / "lora", gguf_adapter=True, ollama=True)
    assert (out / "adapter.gguf").is_file() and (out / "base.f16.gguf").is_file()
    check = json.loads((out / "export_check.json").read_text())["gguf"]
    assert check["lora"] == "adapter.gguf" and check["tokenization_agreement"] == 1.0
    assert all(e["transformers"] for e in check["examples"]), check["examples"]
    assert check["first_logits_max_abs_diff"] < 0.05 and check["greedy_agreement"] >= 0.95, check
    assert ("ADAPTER", "./adapter.gguf") in parse_modelfile((out / "Modelfile").read_text())


def test_the_converter_source_is_checked(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    monkeypatch.setenv("TUNELAB_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(TunelabError, match="no convert_hf_to_gguf.py there"):
        g.llama_cpp_dir()
    monkeypatch.delenv("TUNELAB_LLAMA_CPP")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    prefix = f"llama_cpp_python-{g.LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    sdist = tmp_path / "dl" / "llama_cpp_python.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:  # what the converter needs, and what it does not
        for name in ("convert_hf_to_gguf.py", "conversion/base.py", "ggml/src/big.c", "../../outside.py"):
            data = b"# " + name.encode()
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(g, "_download_sdist", lambda where: sdist)
    monkeypatch.setattr(g, "SDIST_SHA256", "0" * 64)
    with pytest.raises(TunelabError, match="is not the pinned"):
        g.llama_cpp_dir()
    root = tmp_path / "cache" / f"llama.cpp-{g.LLAMA_CPP_PYTHON}"
    assert not root.exists()  # nothing unchecked is kept
    monkeypatch.setattr(g, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    assert g.llama_cpp_dir() == root
    assert (root / "convert_hf_to_gguf.py").is_file() and (root / "conversion" / "base.py").is_file()
    assert not (root / "ggml").exists() and not (tmp_path / "cache" / "outside.py").exists()
