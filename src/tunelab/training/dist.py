"""The process group of a multi-process run (torchrun / `tunelab train --nproc N`), on accelerate.

`processes()` is the one way tunelab asks which process this is: on a machine without CUDA it tells
accelerate to use CPU processes (gloo), which it only does when asked (`cpu=True`); with one process it
is a plain single-process state and costs nothing.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import PartialState


def processes(timeout: float | None = None) -> PartialState:
    """This process's place in the run. `timeout` (seconds a collective waits for the others, the run's
    `train.dist_timeout`) counts only in the first call of a process, the one that starts the group."""
    if timeout is None:
        return PartialState(cpu=not torch.cuda.is_available())
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout))
