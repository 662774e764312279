"""The export's GGUF files, Ollama Modelfile and checks, written into an export's staging folder
(recipes/export.py owns the folder; recipes/gguf.py holds the llama.cpp side)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from tunelab.artifacts import load
from tunelab.errors import TunelabError
from tunelab.methods.dylora import set_rank
from tunelab.recipes import gguf as g

CHECK_FILE = "export_check.json"
MERGE_PROMPTS = ("Where does Ada live?", "Count the words: red blue green", "Hello world\nsecond line, Zürich")


def check_lora(src: Path) -> None:
    cfg = src / "adapter_config.json"
    kind = json.loads(cfg.read_text(encoding="utf-8")).get("peft_type") if cfg.is_file() else None
    if kind != "LORA":
        raise TunelabError(f"--gguf-adapter: {src} is not a LoRA adapter ({kind or 'not a peft adapter'}); llama.cpp "
                           "applies LoRA adapters only", fix="export it merged: --gguf QUANT")


@torch.no_grad()
def merge_check(run: str | Path, merged: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                rank: int | None = None) -> dict[str, Any]:
    """Logits of the run's model (adapter or delta on the base) vs the merged export, on a few prompts."""
    from transformers import AutoModelForCausalLM

    model, tok = load(run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if rank is not None:
        set_rank(model, rank)
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=next(model.parameters()).dtype)
    model.eval()
    plain.eval()
    worst, same = 0.0, 0
    for text in MERGE_PROMPTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        a, b = model(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
        worst = max(worst, (a - b).abs().max().item())
        same += bool((a.argmax(-1) == b.argmax(-1)).all())
    return {"prompts": len(MERGE_PROMPTS), "max_abs_logit_diff": worst, "argmax_agreement": same / len(MERGE_PROMPTS)}


def write_gguf(folder: Path, *, quant: str, ollama: bool, check: bool) -> dict[str, Any]:
    """`folder` holds the merged transformers model: add `model.<quant>.gguf` (+ Modelfile)."""
    name = f"model.{quant}.gguf"
    g.convert(folder, folder / name, quant)
    if ollama:
        _modelfile(folder, name)
    return {"gguf": g.check(folder / name, folder)} if check else {}


def write_gguf_adapter(folder: Path, *, ollama: bool, check: bool) -> dict[str, Any]:
    """`folder` holds a peft LoRA adapter: add `adapter.gguf` and the base as `base.f16.gguf`."""
    model, tok = load(folder)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-base-", dir=folder.parent) as tmp:
        base = Path(tmp) / "base"
        model.unload().save_pretrained(str(base), safe_serialization=True)
        tok.save_pretrained(str(base))
        g.convert(base, folder / "base.f16.gguf", "f16")
        g.convert_lora(folder, base, folder / "adapter.gguf")
        if check:
            merged = Path(tmp) / "merged"
            again, _ = load(folder)
            again.merge_and_unload().save_pretrained(str(merged), safe_serialization=True)
            tok.save_pretrained(str(merged))
            out["gguf"] = g.check(folder / "adapter.gguf", merged, lora=folder / "adapter.gguf",
                                  base_gguf=folder / "base.f16.gguf")
    if ollama:
        _modelfile(folder, "base.f16.gguf", adapter="adapter.gguf")
    return out


def _modelfile(folder: Path, gguf_name: str, adapter: str | None = None) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    (folder / "Modelfile").write_text(g.modelfile(gguf_name, tok, adapter=adapter), encoding="utf-8")


def write_checks(folder: Path, checks: dict[str, Any]) -> None:
    if not checks:
        return
    (folder / CHECK_FILE).write_text(json.dumps(checks, indent=1), encoding="utf-8")
    lines = ["# tunelab export\n"]
    if "merge" in checks:
        m = checks["merge"]
        lines.append(f"\n## merge check\n\nThe merged weights vs the run's model, {m['prompts']} prompts: "
                     f"max |logit difference| {m['max_abs_logit_diff']:.2e}, same argmax at every position in "
                     f"{m['argmax_agreement']:.0%} of them.\n")
    if "gguf" in checks:
        lines.append(g.check_section(checks["gguf"]))
    readme = folder / "README.md"
    head = readme.read_text(encoding="utf-8") + "\n" if readme.is_file() else ""
    readme.write_text(head + "".join(lines), encoding="utf-8")
