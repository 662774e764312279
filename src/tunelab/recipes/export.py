"""Export a run's final model: as it is (adapter, delta or full model), or merged into the base."""

from __future__ import annotations

import shutil
from pathlib import Path

from peft import PeftModel

from tunelab import owned
from tunelab.artifacts import is_delta, load, load_delta_config
from tunelab.errors import TunelabError
from tunelab.methods import METHODS
from tunelab.modeling.load import check_weight_files


def export(
    run: str | Path, out: str | Path, *, merge: bool = False, force: bool = False, trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write a run's final model to `out`: as it is (adapter, delta or full model), or with
    `merge` folded into the base weights as a plain transformers model.

    Written beside `out` and renamed into place (owned.install): a previous export there is
    replaced, a folder tunelab did not write is refused (with `force`: written beside its files)."""
    src = Path(run) / "final" if (Path(run) / "config.yaml").is_file() else Path(run)
    out = Path(out)
    owned.preflight(out, "export", what="--out", force=force)
    check_weight_files(src)
    tmp = owned.staging(out)
    try:
        if merge:
            _save_merged(run, src, tmp, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        else:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(owned.MARKER))
    except BaseException:
        owned.remove(tmp)
        raise
    return owned.install(tmp, out, "export", what="--out", force=force)


def _save_merged(
    run: str | Path, src: Path, out: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False,
) -> None:
    model, tok = load(run, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
