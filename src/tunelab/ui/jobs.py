"""Training runs the UI started: `tunelab train CONFIG output.dir=ROOT/NAME` as a child process (an
argument list, never a shell), stopped with SIGTERM (the run finishes its step, checkpoints and exits
75: `--resume` continues). Only processes this UI started can be stopped.

The run is written under a root (output.dir is set from the form), so the runs page shows it; its
console output goes to a log file outside the run folder (a file tunelab did not write there would make
the folder refuse a later `--overwrite`). Settings of the config never grant code or unpickling here:
`model.trust_remote_code` and `model.allow_pickle` are passed as false (the CLI grants them).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tunelab.ui.paths import Refused

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NO_GRANTS = ["model.trust_remote_code=false", "model.allow_pickle=false"]
LOG_TAIL = 4000


@dataclass
class Job:
    run: Path
    process: subprocess.Popen
    log: Path
    argv: list[str]

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        return {0: "finished", 75: "interrupted"}.get(code, "failed")

    def view(self, ref: str) -> dict[str, Any]:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - LOG_TAIL))
                tail = f.read().decode("utf-8", errors="replace")
        except OSError:
            tail = ""
        return {"run": ref, "pid": self.process.pid, "state": self.state, "exit_code": self.process.poll(),
                "argv": self.argv, "log": tail}


class Jobs:
    def __init__(self) -> None:
        self.by_run: dict[Path, Job] = {}
        self.lock = threading.Lock()
        self.logs = Path(tempfile.mkdtemp(prefix="tunelab-ui-logs-"))

    def start(self, config: Path, root: Path, name: str, resume: bool) -> Job:
        if not NAME.fullmatch(name):
            raise Refused(400, f"run name {name!r}: use letters, digits, '.', '_' and '-' (up to 100)")
        if config.suffix not in (".yaml", ".yml"):
            raise Refused(400, f"{config.name}: a config is a .yaml file")
        run = root / name
        with self.lock:
            old = self.by_run.get(run)
            if old is not None and old.state == "running":
                raise Refused(409, f"{name} is already running (pid {old.process.pid}): stop it first")
            argv = [sys.executable, "-m", "tunelab", "train", str(config), f"output.dir={run}", *NO_GRANTS,
                    *(["--resume"] if resume else [])]
            log = self.logs / f"{name}.log"
            out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - the child holds it; closed below
            try:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            finally:
                out.close()
            job = self.by_run[run] = Job(run, process, log, argv)
        return job

    def stop(self, run: Path) -> Job:
        job = self.by_run.get(run)
        if job is None:
            raise Refused(404, f"{run.name}: this UI did not start it (stop it where it runs)")
        if job.state == "running":
            job.process.send_signal(signal.SIGTERM)
        return job

    def stop_all(self) -> None:
        for job in self.by_run.values():
            if job.state == "running":
                job.process.send_signal(signal.SIGTERM)
