"""Goodput recorder: attribution by cause, intervals, totals that sum to wall time, compile carved out of steps."""

import threading
import time

import jax
import jax.numpy as jnp
import pytest

from vlm_jax.goodput import BADPUT, Goodput


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class Running:
    """A dispatched step the device has not finished (jax.Array.is_ready() is False)."""

    def is_ready(self) -> bool:
        return False


def test_intervals_and_totals_sum_to_wall_time():
    clock = FakeClock()
    goodput = Goodput(clock, listen=False)
    clock.tick(3)  # startup
    goodput.switch("step")
    with goodput.data_wait(None):  # nothing dispatched yet: the device waits for this batch
        clock.tick(1)
    clock.tick(0.5)
    goodput.record_compile(0.25)  # the first step's compilation, inside the last 0.5 s
    clock.tick(4)
    with goodput.timed("checkpoint"):
        clock.tick(2)
        with goodput.timed("evaluation"):  # innermost block wins
            clock.tick(1.5)
    first = goodput.interval()
    assert first == {"goodput/fraction": 4.25 / 12, "goodput/wall_s": 12.0, "goodput/step_s": 4.25,
                     "badput/compile_s": 0.25, "badput/data_wait_s": 1.0, "badput/checkpoint_s": 2.0,
                     "badput/evaluation_s": 1.5, "badput/startup_s": 3.0, "badput/other_s": 0.0}

    clock.tick(6)
    goodput.switch("other")
    clock.tick(2)
    second = goodput.interval()
    assert second["goodput/wall_s"] == 8 and second["goodput/step_s"] == 6 and second["badput/other_s"] == 2
    assert second["goodput/fraction"] == 0.75

    totals = goodput.totals()
    assert totals["goodput/total_wall_s"] == pytest.approx(clock.now - 100)
    parts = totals["goodput/total_step_s"] + sum(totals[f"badput/total_{cause}_s"] for cause in BADPUT)
    assert parts == pytest.approx(totals["goodput/total_wall_s"])
    assert totals["goodput/total_fraction"] == pytest.approx(10.25 / 20)
    assert goodput.summary() == ("goodput 51.2% (compile 0.2 s, data wait 1.0 s, checkpoint 2.0 s, "
                                 "evaluation 1.5 s, startup 3.0 s, other 2.0 s) of 20.0 s")


def test_data_wait_overlapped_with_a_running_step_is_step_time():
    clock = FakeClock()
    goodput = Goodput(clock, listen=False)
    goodput.switch("step")
    with goodput.data_wait({"loss": Running()}):  # the previous step still ran when the batch arrived
        clock.tick(1)
    with goodput.data_wait({"loss": jnp.float32(1.0)}):  # finished: the device idled
        clock.tick(2)
    scalars = goodput.interval()
    assert scalars["goodput/step_s"] == 1 and scalars["badput/data_wait_s"] == 2


def test_compile_cannot_exceed_the_time_since_the_last_mark():
    clock = FakeClock()
    goodput = Goodput(clock, listen=False)
    goodput.switch("step")
    clock.tick(1)
    goodput.record_compile(5)
    assert goodput.interval()["badput/compile_s"] == 1


def test_an_unknown_cause_is_refused():
    goodput = Goodput(FakeClock(), listen=False)
    with pytest.raises(ValueError, match="unknown goodput cause 'eval'"):
        goodput.switch("eval")


def test_the_first_step_compiles_and_later_steps_do_not():
    """Real JAX compile events: the first call's tracing and compilation count as compile, not step."""

    @jax.jit
    def train_step(x):
        time.sleep(0.3)  # runs while tracing, i.e. compile time
        return x * 2 + 1

    with Goodput() as goodput:
        goodput.switch("step")
        train_step(jnp.ones(4)).block_until_ready()
        first = goodput.interval()
        train_step(jnp.ones(4)).block_until_ready()
        second = goodput.interval()
        other_thread = threading.Thread(target=lambda: jax.jit(lambda x: x - 3)(jnp.ones(4)).block_until_ready())
        other_thread.start()
        other_thread.join()
        third = goodput.interval()
    assert first["badput/compile_s"] >= 0.3
    assert first["goodput/step_s"] < first["badput/compile_s"]
    assert second["badput/compile_s"] == 0
    assert third["badput/compile_s"] == 0  # compiled on another thread: overlapped, not this loop's time
    parts = first["goodput/step_s"] + sum(first[f"badput/{cause}_s"] for cause in BADPUT)
    assert parts == pytest.approx(first["goodput/wall_s"])
