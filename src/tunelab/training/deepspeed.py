"""DeepSpeed ZeRO (`train.distributed: deepspeed_zero2 | deepspeed_zero3`): its config, generated from
tunelab's and written to RUN/deepspeed.json, so the batch, accumulation, clipping and precision are
stated once (tunelab's config) and DeepSpeed agrees with them.

The optimizer and schedule stay tunelab's (no `optimizer`/`scheduler` section: the client optimizer
accelerate hands to DeepSpeed). The loop does not drive DeepSpeed's engine yet: that engine applies
the optimizer step inside `backward` (before tunelab's non-finite guard could refuse it) and saves
its own pickled checkpoints, which break two promises of RELIABILITY.md; `check_runnable` says so
in one line. FSDP2 (`train.distributed: fsdp`) shards like ZeRO-3 and keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.runconfig import RunConfig

CONFIG_FILE = "deepspeed.json"
STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}


def config(cfg: RunConfig, world: int, mixed: str) -> dict[str, Any]:
    """The DeepSpeed config of a run in `world` processes; `mixed`: accelerate's resolved precision
    ("no" | "bf16" | "fp16")."""
    t = cfg.train
    stage = STAGES[t.distributed]
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 2:
        zero.update(reduce_scatter=True, allgather_partitions=True)
    else:  # the final save gathers the whole model (save_pretrained), not DeepSpeed's shard files
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        "bf16": {"enabled": mixed == "bf16"},
        # loss_scale 0: dynamic loss scaling, as accelerate's GradScaler does for fp16 elsewhere
        "fp16": {"enabled": mixed == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # methods bring their own (LoRA+ groups, 8-bit AdamW)
        "seed": t.seed,
        "steps_per_print": 10**9,  # tunelab logs every step itself
        "wall_clock_breakdown": False,
    }


def write_config(cfg: RunConfig, run_dir: Path, world: int, mixed: str) -> Path:
    path = run_dir / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config(cfg, world, mixed), indent=1), encoding="utf-8")
    return path


def check_runnable(path: Path) -> None:
    """DeepSpeed is installed, and the one line of why tunelab's loop does not run it yet."""
    try:
        import deepspeed  # noqa: F401  # an optional extra: imported only when asked for
    except ImportError:
        raise ConfigError("train.distributed=deepspeed_*: DeepSpeed is not installed",
                          fix="pip install deepspeed (DS_BUILD_OPS=0 on a machine without CUDA), "
                          "or use train.distributed=fsdp") from None
    raise ConfigError(f"DeepSpeed config written to {path}; tunelab's loop does not drive DeepSpeed's engine yet "
                      "(it steps inside backward, before the non-finite guard, and pickles its checkpoints)",
                      fix="use train.distributed=fsdp (FSDP2 shards weights, gradients and optimizer like ZeRO-3)")
