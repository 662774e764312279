"""The process group of a multi-process run (torchrun / `tunelab train --nproc N`), on accelerate.

`processes()` is the one way tunelab asks which process this is: on a machine without CUDA it tells
accelerate to use CPU processes (gloo), which it only does when asked (`cpu=True`); with one process it
is a plain single-process state and costs nothing.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def processes() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())
