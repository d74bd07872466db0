"""grain data worker processes: they leave signals to the trainer, exit when the process that started them
dies, and the iterator state records how many there were.

Signals: a preemption or a Ctrl-C often reaches the whole process group (a host shutting down, a terminal).
The trainer answers SIGTERM by saving at an agreed step, which needs its data workers until the end of that
step, and SIGINT by closing its iterator; a worker killed by either first would fail the save or print a
traceback per worker. So workers ignore both; grain stops them on close (an event, then SIGKILL).

Orphans: a trainer killed by SIGKILL, the OOM killer or a preemption cannot close its iterator, and grain's
workers would wait on their full output queues for ever (reparented to init, holding their memory). Linux's
PR_SET_PDEATHSIG does not help: it fires when the *thread* that started the worker exits, and grain starts
workers from short-lived threads. So each worker runs a watchdog thread that polls its parent.

Worker count: grain hands each worker every n-th shard and interleaves the workers' batches, so the sample
stream and the shape of the iterator state depend on n. The state carries n, and a restore with another
count is refused with one line naming both (rather than crashing deep in grain or feeding other samples).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import grain

from data_pipelines.samples import DataError

PARENT_POLL_S = 0.5


def init_data_worker(worker_index: int, worker_count: int) -> None:
    """grain `worker_init_fn`: ignores SIGTERM and SIGINT, and ends this worker process within PARENT_POLL_S
    once its parent has gone.

    The parent is multiprocessing's record of it (its pid and its end of the spawn pipe), so a parent that
    died while this worker was still starting is noticed too; either sign (pid reparented, pipe closed) ends
    the worker.
    """
    del worker_index, worker_count  # every worker watches the same parent
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child: nothing to watch
        return

    def watch() -> None:
        while os.getppid() == parent.pid and parent.is_alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no cleanup to run: the process that would read this worker's output is gone

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _WorkerCountIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, num_workers: int, setting: int | str):
        super().__init__(parent)
        self._num_workers, self._setting = num_workers, setting

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {"num_workers": self._num_workers, "parent": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        saved = state.get("num_workers")
        if saved is None:
            raise DataError("the data iterator state records no worker count (saved before counts were "
                            "recorded): resume it with the version of the code that saved it")
        if saved != self._num_workers:
            raise DataError(f"the data iterator state was saved with {saved} data workers but this run has "
                            f"{self._num_workers} (data.num_workers={self._setting!r}): the sample order depends "
                            f"on the count; set data.num_workers={saved} to resume this run")
        self._parent.set_state(state["parent"])


class WorkerCountIterDataset(grain.IterDataset):
    """`parent`'s elements; the iterator state records `num_workers` and set_state refuses another count.

    `setting` is the configured value (e.g. 'auto') for the error message.
    """

    def __init__(self, parent: grain.IterDataset, num_workers: int, setting: int | str):
        super().__init__(parent)
        self._num_workers, self._setting = num_workers, setting

    def __iter__(self) -> _WorkerCountIterator:
        return _WorkerCountIterator(self._parent.__iter__(), self._num_workers, self._setting)
