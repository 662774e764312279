"""Guards around the loop: stop signals turned into a checkpoint, non-finite steps caught, a full
disk turned into one line that says how to continue."""

from __future__ import annotations

import errno
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from safetensors import SafetensorError

from tunelab.errors import NonFiniteError, TunelabError


class StopSignal:
    """First SIGTERM/SIGINT asks the loop to finish its step, checkpoint and exit resumable (a run
    already finished finishes writing and exits 0); a second signal of either kind interrupts at
    once (a step that never ends cannot hold the process)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, signals keep their default
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name


def agreed(stop: StopSignal, accelerator: Any) -> bool:
    """Whether to stop now, the same answer in every process: a signal may reach them a step apart (or
    only one of them), and a process that stops while another steps leaves both waiting on each other
    (FSDP gathers, DDP's all-reduce). One number per step, summed over the processes."""
    if accelerator.num_processes > 1:
        import torch

        asked = accelerator.reduce(torch.tensor(float(bool(stop.requested)), device=accelerator.device), "sum")
        if float(asked) > 0 and not stop.requested:
            stop.requested = "a signal to another process"
    return bool(stop.requested)


class NonFiniteGuard:
    """Decides what a step whose loss or gradient norm is NaN/inf does: halt, or skip (capped)."""

    def __init__(self, policy: str, max_consecutive: int, run_dir: Path | None = None):
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.run_dir = run_dir
        self.consecutive = 0
        self.skipped = 0

    def check(self, step: int, loss: float, grad_norm: float, samples: list[str]) -> bool:
        """True when the step may apply; False to skip it; raises to halt."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        what = f"loss={loss} grad_norm={grad_norm} at step {step + 1}"
        shown = ", ".join(samples[:8]) + (" ..." if len(samples) > 8 else "")
        if self.policy == "skip" and self.consecutive < self.max_consecutive:
            self.consecutive += 1
            self.skipped += 1
            return False
        reason = "" if self.policy == "halt" else f" ({self.consecutive} consecutive skips, the cap)"
        raise NonFiniteError(
            f"non-finite {what}{reason}; the optimizer step was not applied. Samples: {shown}",
            fix=self.advice(),
        )

    def advice(self) -> str:
        """A command that continues from a good checkpoint with a lower learning rate."""
        run = self.run_dir or "RUN"
        return (f"check these samples, then continue with a lower lr: tunelab train {run} --resume train.lr=<lower> "
                "--allow-changed (--resume-from step-N for an earlier checkpoint)")

    def check_weights(self, step: int, params: list[Any]) -> None:
        """After a step: a finite loss and gradient can still make the weights infinite (a huge lr);
        halt before that step is checkpointed."""
        import torch

        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one sync
            return
        raise NonFiniteError(f"the update of step {step} made trainable weights non-finite (train.lr too large?); "
                             "it was not checkpointed", fix=self.advice())


def is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def oom_error(err: BaseException, *, step: int, batch_size: int, grad_accum: int, seq_len: int) -> TunelabError:
    """What to change when a step runs out of memory, with the numbers that matter."""
    import torch

    peak = ""
    if torch.cuda.is_available():
        peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return TunelabError(
        f"out of memory at step {step + 1} (micro-batch {batch_size} x {seq_len} tokens{peak}): {str(err)[:200]}",
        fix=f"lower train.batch_size and raise train.grad_accum (e.g. batch_size={max(1, batch_size // 2)} "
        f"grad_accum={grad_accum * 2} keeps the effective batch), lower data.max_length, or set "
        "train.gradient_checkpointing=true",
    )


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, SafetensorError) and ("No space left" in str(e) or "StorageFull" in str(e))


@contextmanager
def peer_lost_guard(world: int, run_dir: Path, last_good: Callable[[], Path | None]) -> Iterator[None]:
    """In a run of several processes, a collective that fails because another process is gone (killed,
    crashed, its machine lost: gloo and NCCL report a closed connection at once, or a timeout after
    `train.dist_timeout` seconds) becomes one TunelabError naming the last good checkpoint."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed's DistError / DistBackendError are RuntimeErrors
        if world < 2 or not _peer_lost(e):
            raise
        cause = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise _stopped(f"another process of this run stopped or cannot be reached ({cause[:200]}); this one stops "
                       "too", "see why the other process stopped (its lines above or its machine's log), then",
                       run_dir, last_good(), ", in as many processes") from None


def _stopped(what: str, first: str, run_dir: Path, good: Path | None, resume_note: str = "") -> TunelabError:
    """`what` happened: the error naming the last good checkpoint, whose fix (after `first`) continues from it
    with --resume, or starts again when there is none."""
    return TunelabError(
        f"{what}: " + (f"the last good checkpoint is {good.name}" if good else "no checkpoint yet"),
        fix=f"{first} " + (f"continue with: tunelab train {run_dir} --resume{resume_note}" if good else
                           f"start again: tunelab train ... output.dir={run_dir} --overwrite"))


PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "nccl",
             "socket", "peer")


def _peer_lost(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or ("gloo" in text and any(k in text for k in PEER_LOST))


@contextmanager
def disk_full_guard(run_dir: Path, last_good: Callable[[], Path | None]) -> Iterator[None]:
    """A full disk while writing a checkpoint, metrics or the final model becomes a TunelabError
    naming where it happened and the last good checkpoint (`last_good()`), which --resume continues."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if not _disk_full(e):
            raise
        where = getattr(e, "filename", None) or run_dir
        raise _stopped(f"disk full at {where}", "free space, then", run_dir, last_good()) from None
