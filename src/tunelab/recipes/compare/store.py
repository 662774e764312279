"""Where a compare's cells live: one table in a real database (SQLAlchemy: `sqlite:///...` by
default, a PostgreSQL URL to share one compare between machines).

A worker claims a pending cell with one conditional UPDATE (`... WHERE status = 'pending'`): of
any number of workers on any number of machines, exactly one gets it. A running cell's worker
beats a heartbeat; a cell whose worker is gone (its process is dead on this host, or its heartbeat
is older than `stale_after`) goes back to pending. Finished cells are never run again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from tunelab.errors import TunelabError

PENDING, RUNNING, DONE, FAILED, INVALID = "pending", "running", "done", "failed", "invalid"

_meta = MetaData()
CELLS = Table(
    "tunelab_compare_cells", _meta,
    Column("compare_id", String(64), primary_key=True),  # not "compare": a ColumnCollection method
    Column("cell", String(400), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("worker", String(200)),
    Column("heartbeat", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("result", Text),
    Column("error", Text),
)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(worker: str | None) -> bool | None:
    """Whether a worker of this host is alive; None for another host's (only its heartbeat says)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, url: str, compare: str, stale_after: float = 120.0):
        try:
            self.engine: Engine = create_engine(url, future=True)
            _meta.create_all(self.engine)
        except (SQLAlchemyError, ValueError) as e:
            raise TunelabError(f"cannot open the compare database {url}: {str(e).splitlines()[0]}",
                               fix="pass --db sqlite:///PATH or a reachable postgresql:// URL") from None
        self.compare, self.stale_after, self.me = compare, stale_after, worker_id()

    def add(self, key: str, status: str = PENDING, error: str | None = None) -> None:
        """Register a cell once; a cell already there (a resumed compare) keeps its state."""
        try:
            with self.engine.begin() as c:
                c.execute(insert(CELLS).values(compare_id=self.compare, cell=key, status=status, attempts=0,
                                               error=error))
        except IntegrityError:
            pass

    def rows(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as c:
            found = c.execute(select(CELLS).where(CELLS.c.compare_id == self.compare)).mappings().all()
        return {r["cell"]: dict(r) for r in found}

    def reclaim(self) -> list[str]:
        """Running cells whose worker is gone go back to pending; returns their keys."""
        now, back = time.time(), []
        for key, r in self.rows().items():
            if r["status"] != RUNNING:
                continue
            alive = _alive_here(r["worker"])
            if alive is False or (alive is None and now - (r["heartbeat"] or 0) > self.stale_after):
                with self.engine.begin() as c:
                    done = c.execute(update(CELLS).where(and_(
                        CELLS.c.compare_id == self.compare, CELLS.c.cell == key, CELLS.c.status == RUNNING,
                        CELLS.c.worker == r["worker"])).values(status=PENDING, worker=None)).rowcount
                back += [key] if done else []
        return back

    def claim(self, order: list[str]) -> str | None:
        """The first pending cell of `order` this worker won, or None when none is left."""
        pending = {k for k, r in self.rows().items() if r["status"] == PENDING}
        for key in (k for k in order if k in pending):
            with self.engine.begin() as c:
                won = c.execute(update(CELLS).where(and_(
                    CELLS.c.compare_id == self.compare, CELLS.c.cell == key, CELLS.c.status == PENDING)).values(
                    status=RUNNING, worker=self.me, heartbeat=time.time(), attempts=CELLS.c.attempts + 1)).rowcount
            if won:
                return key
        return None

    def beat(self, key: str) -> None:
        with self.engine.begin() as c:
            c.execute(update(CELLS).where(and_(CELLS.c.compare_id == self.compare, CELLS.c.cell == key,
                                               CELLS.c.worker == self.me)).values(heartbeat=time.time()))

    def finish(self, key: str, status: str, result: dict[str, Any] | None, error: str | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(update(CELLS).where(and_(CELLS.c.compare_id == self.compare, CELLS.c.cell == key)).values(
                status=status, result=json.dumps(result) if result is not None else None, error=error,
                heartbeat=time.time()))

    def retry_failed(self) -> int:
        """Failed cells go back to pending (`--retry-failed`); returns how many."""
        with self.engine.begin() as c:
            return c.execute(update(CELLS).where(and_(CELLS.c.compare_id == self.compare, CELLS.c.status == FAILED))
                             .values(status=PENDING, worker=None, result=None, error=None)).rowcount
