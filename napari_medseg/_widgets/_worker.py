"""Running a core job generator in a napari worker thread."""
from __future__ import annotations

from napari.qt.threading import GeneratorWorker, create_worker

from ..core.progress import lower_thread_priority


class ClosingGeneratorWorker(GeneratorWorker):
    """A napari ``GeneratorWorker`` that closes its generator on the worker thread when it stops.

    ``worker.quit()`` makes the worker stop at the job's next yield but leaves the generator
    suspended; closing it here runs the job's own cleanup at once and on this thread (the engine
    finishes the block it is writing and stops its prefetch pool), so the output store is
    consistent as soon as ``finished`` is emitted and a new run can resume it. The job runs at a
    lower CPU priority than the GUI (:func:`lower_thread_priority`), so napari stays responsive
    when the job keeps every core busy.
    """

    def work(self):
        lower_thread_priority()
        try:
            return super().work()
        finally:
            self._gen.close()


def start_job(job, request, description: str, connect: dict) -> ClosingGeneratorWorker:
    """Start ``job(request)`` in a worker with a napari progress bar; ``connect`` maps signal
    names (``yielded``, ``returned``, ``errored``, ``aborted``, ``finished``) to callbacks, which
    Qt runs on the GUI thread. Errors are left to the ``errored`` callback."""
    worker = create_worker(job, request, _worker_class=ClosingGeneratorWorker,
                           _progress={"total": 0, "desc": description}, _ignore_errors=True)
    for signal, callback in connect.items():
        getattr(worker, signal).connect(callback)
    worker.start()
    return worker


def update_progress_bar(worker, done: int, total: int, description: str) -> None:
    """Move the worker's napari progress bar (activity dock) to ``done`` of ``total``."""
    bar = getattr(worker, "pbar", None)
    if bar is None:
        return
    if bar.total != total:
        bar.total = total
    if bar.desc != description:
        bar.set_description(description)
    bar.n = min(done, total) if total else done
    bar.update(0)
