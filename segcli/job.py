"""One file moving through read → compute → write (:mod:`segcli.pipeline`): its report, its output, the
route serving it, its lock, and the time it spent working (not waiting in the batch's queue)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segcli.errors import SegcliError, bug_message
from segcli.io.atomic import OutputLock, os_error_words
from segcli.report import FileReport


@dataclass
class Job:
    """One file moving through read → compute → write."""

    path: Path
    rep: FileReport
    t0: float
    out: Path | None = None
    route: Any = None  # a Route once the input is open
    lock: OutputLock | None = None
    busy: float = 0.0  # seconds of this file's own work (read, compute, write), not its wait in the queue
    finished: bool = False  # finish() ran: an interrupted batch's cleanup may call it again

    def fail_from(self, exc: BaseException, writing: bool = False) -> None:
        """Record ``exc`` as this file's failure: a SegcliError as itself, an operating-system failure (disk
        full, permission, read-only...) in the user's words naming the user's file, anything else as a bug."""
        self.rep.status = "failed"
        self.close_route()
        words = os_error_words(exc)
        if words is not None:
            self.rep.error = f"{self._user_path(getattr(exc, 'filename', None), writing)}: {words}"
        elif not isinstance(exc, SegcliError):
            self.rep.error = bug_message(exc, self.path)
        elif exc.path is not None:
            self.rep.error = str(exc)
        else:
            self.rep.error = f"{self.path}: {exc}"

    def _user_path(self, name: Any, writing: bool) -> Path:
        """The path the user knows for an OS error's file: the output for its hidden temporary names."""
        if name is None:
            return self.out if writing and self.out is not None else self.path
        p = Path(str(name))
        if self.out is not None and p.name.startswith(".") and (".partial-" in p.name or p.name.endswith(".lock")):
            return self.out
        return p

    def close_route(self) -> None:
        if self.route is not None:
            self.route.close()
            self.route = None

    def finish(self) -> FileReport:
        """Release the lock and the route's resources; stamp the total time (once)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.close_route()
        if self.finished:
            return self.rep
        self.finished = True
        wall = time.perf_counter() - self.t0
        self.rep.seconds["total"] = self.busy if self.busy > 0 else wall
        if wall - self.busy > 0.001 and self.busy > 0:
            self.rep.seconds["queued"] = wall - self.busy  # read ahead, or waiting for the writer
        return self.rep
