"""Export a run's final model: as it is (adapter, delta or full model), or merged into the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peft import PeftModel

from tunelab import owned
from tunelab.artifacts import METHOD_FILE, is_delta, load, load_delta_config
from tunelab.errors import TunelabError
from tunelab.methods import METHODS
from tunelab.methods.dylora import set_rank
from tunelab.modeling.load import check_weight_files
from tunelab.recipes.gguf import QUANTS
from tunelab.recipes.gguf_export import check_lora, merge_check, write_checks, write_gguf, write_gguf_adapter


def export(
    run: str | Path, out: str | Path, *, merge: bool = False, force: bool = False, trust_remote_code: bool = False,
    allow_pickle: bool = False, rank: int | None = None, gguf: str | None = None, gguf_adapter: bool = False,
    ollama: bool = False, check: bool = True,
) -> Path:
    """Write a run's final model to `out`: as it is (adapter, delta or full model), or with
    `merge` folded into the base weights as a plain transformers model. `rank`: a DyLoRA run at
    rank k (1 <= k <= r): merged with B[:, :k] A[:k], or as a delta that loads at rank k.

    Written beside `out` and renamed into place (owned.install): a previous export there is
    replaced, a folder tunelab did not write is refused (with `force`: written beside its files).

    `gguf` (a quant: f16, q8_0, q4_k_m): also the merged model as one GGUF file for llama.cpp;
    `gguf_adapter`: a LoRA run's adapter as a LoRA GGUF beside the base as an f16 GGUF; `ollama`: a
    Modelfile beside the GGUF. `check` (default on): merged vs adapter logits after a merge, and
    llama.cpp vs transformers after a GGUF export (recipes/gguf.py), written into the export's
    README.md and export_check.json."""
    src = Path(run) / "final" if (Path(run) / "config.yaml").is_file() else Path(run)
    out = Path(out)
    owned.preflight(out, "export", what="--out", force=force)
    check_weight_files(src)
    if rank is not None:
        _check_rank(src, rank)
    if gguf is not None and gguf_adapter:
        raise TunelabError("--gguf and --gguf-adapter: pick one", fix="--gguf for a merged model, --gguf-adapter for "
                           "a LoRA adapter that llama.cpp applies to the base at load")
    if ollama and gguf is None and not gguf_adapter:
        raise TunelabError("--ollama writes a Modelfile for a GGUF export", fix="add --gguf QUANT (e.g. --gguf q8_0)")
    if gguf is not None and gguf not in QUANTS:
        raise TunelabError(f"--gguf {gguf}: not one of {', '.join(QUANTS)}", fix="e.g. --gguf q8_0")
    if gguf_adapter:
        check_lora(src)
    tmp = owned.staging(out)
    try:
        if merge or gguf is not None:
            _save_merged(run, src, tmp, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, rank=rank)
            checks = {"merge": merge_check(run, tmp, trust_remote_code=trust_remote_code,
                                           allow_pickle=allow_pickle, rank=rank)} if check else {}
            if gguf is not None:
                checks.update(write_gguf(tmp, quant=gguf, ollama=ollama, check=check))
            write_checks(tmp, checks)
        else:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(owned.MARKER))
            if gguf_adapter:
                write_checks(tmp, write_gguf_adapter(tmp, ollama=ollama, check=check))
            if rank is not None:  # the delta keeps every factor; it loads (and merges) at this rank
                meta = json.loads((tmp / METHOD_FILE).read_text(encoding="utf-8"))
                meta["method"]["eval_rank"] = rank
                (tmp / METHOD_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    except BaseException:
        owned.remove(tmp)
        raise
    return owned.install(tmp, out, "export", what="--out", force=force)


def _check_rank(src: Path, rank: int) -> None:
    cfg = load_delta_config(src) if is_delta(src) else None
    if cfg is None or cfg.name != "dylora":
        raise TunelabError(f"--rank {rank}: only a DyLoRA run can be exported at another rank (this one is "
                           f"{cfg.name if cfg is not None else 'not a tunelab delta'})", fix="drop --rank")
    if not 1 <= rank <= cfg.r:
        raise TunelabError(f"--rank {rank}: outside 1..{cfg.r}, the ranks this DyLoRA run was trained for",
                           fix=f"pick a rank in 1..{cfg.r}")


def _save_merged(
    run: str | Path, src: Path, out: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
    rank: int | None = None,
) -> None:
    model, tok = load(run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if rank is not None:
        set_rank(model, rank)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    elif is_delta(src):
        method_cfg = load_delta_config(src)
        if not METHODS[method_cfg.name].mergeable:
            raise TunelabError(f"method {method_cfg.name!r} cannot be merged into the base weights",
                               fix="export without --merge: the method's own format loads with tunelab.load")
        model = METHODS[method_cfg.name].merge(model, method_cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
