"""The progress record every long job (inference, training, fine-tuning, export) yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, TypeVar

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
    """

    stage: str
    done: int
    total: int
    message: str = ""
    metrics: dict = field(default_factory=dict)
    region: tuple[int, int, int, int] | None = None

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
