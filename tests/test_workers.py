"""grain worker processes: they exit when their parent is killed, and a restore with another worker count is
a one-line DataError naming both counts."""

import os
import signal
import subprocess
import sys
import time

import pytest

from data_pipelines.input_pipeline import TrainInput, default_pp_train, make_train_dataset
from data_pipelines.samples import DataError
from processes import alive, descendants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(shards, num_workers: int) -> TrainInput:
    return TrainInput(sources={"train": f"{shards}/train/*.tar"}, weights={"train": 1.0},
                      pp=default_pp_train(16, 12), tokenizer=str(shards / "spm.model"), global_batch_size=4,
                      seed=1, shuffle_buffer=10, cycle_length=2, num_workers=num_workers, worker_buffer_size=1)


def state_after_one_batch(shards, num_workers: int) -> dict:
    iterator = iter(make_train_dataset(options(shards, num_workers)))
    next(iterator)
    state = iterator.get_state()
    iterator.close()
    return state


@pytest.mark.parametrize("saved, restored", [(0, 2), (2, 0)])
def test_restore_with_another_worker_count_is_refused_in_one_line(synthetic_shards, saved, restored):
    state = state_after_one_batch(synthetic_shards, saved)
    iterator = iter(make_train_dataset(options(synthetic_shards, restored)))
    with pytest.raises(DataError) as error:
        iterator.set_state(state)
    iterator.close()
    assert str(error.value) == (
        f"the data iterator state was saved with {saved} data workers but this run has {restored} "
        f"(data.num_workers={restored}): the sample order depends on the count; "
        f"set data.num_workers={saved} to resume this run")


HOLDER = """
import sys, time
from absl import flags
from data_pipelines.input_pipeline import TrainInput, make_train_dataset
if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    iterator = iter(make_train_dataset(TrainInput(
        sources={"train": sys.argv[1] + "/train/*.tar"}, weights={"train": 1.0}, pp="decode_rrc(16)|keep('image')",
        tokenizer="", global_batch_size=4, shuffle_buffer=10, cycle_length=2, num_workers=2,
        worker_buffer_size=1)))
    next(iterator)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_their_parent_is_killed(synthetic_shards, tmp_path):
    """A process holding a 2-worker iterator is SIGKILLed: every process it started is gone within 5 s."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(synthetic_shards)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started = []
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = descendants(holder.pid)
        assert len(started) >= 2  # the two workers (and multiprocessing's resource tracker)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in started if alive(pid)] == []
    finally:
        holder.kill()
        holder.wait(timeout=10)
        for pid in started:  # on failure: end the orphans this test made, so the session leaves none
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
