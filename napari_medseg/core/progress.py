"""The progress record every long job (inference, training, fine-tuning, export) yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long job.

    Attributes:
        stage: what is running, e.g. ``"tiles"``, ``"instances"``, ``"train"``, ``"export"``.
        done: units finished in this stage.
        total: units in this stage (0 when unknown).
        message: one line for a status bar.
        metrics: numbers worth showing live, e.g. ``{"loss": 0.31}``.
        region: ``(y0, y1, x0, x1)`` of the image just written, so a viewer can refresh it.
        payload: an object the job hands its consumer once, e.g. the output's layer data, read on
            the job's thread so that a GUI does not wait for storage (None for most records).
    """

    stage: str
    done: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)
    region: tuple[int, int, int, int] | None = None
    payload: Any = None

    @property
    def fraction(self) -> float:
        """``done / total`` in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total else 0.0


JobGenerator = Generator[Progress, None, T]


def drain(job: "JobGenerator[T]", on_progress=None) -> T:
    """Run a job generator to the end synchronously and return its result.

    Args:
        job: a generator yielding :class:`Progress` and returning a result.
        on_progress: optional callback receiving each record (e.g. a terminal progress bar).
    """
    while True:
        try:
            record = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(record)


BACKGROUND_NICENESS = 5    # how much lower than the GUI a job thread (and the threads it starts) runs:
#   5 gives the GUI thread ~3x the CPU share of a job thread it competes with, yet the job still
#   gets a fair share next to other programs (10 would leave it ~10 % against each busy one)


def lower_thread_priority(increment: int = BACKGROUND_NICENESS) -> bool:
    """Run the calling thread, and threads it starts later (e.g. PyTorch's CPU pool), at a lower
    CPU priority than the main (GUI) thread, so that on a busy machine the GUI gets the CPU first.

    Linux only (per-thread niceness); elsewhere, or when not permitted, does nothing. Idempotent:
    a pooled thread that runs several jobs ends at the main thread's niceness + ``increment``.

    Returns:
        Whether the thread now runs at the lower priority.
    """
    import os
    import sys
    import threading

    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return False
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + increment)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        return False
    return True
