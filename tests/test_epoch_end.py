"""The epoch-end machinery off the training path: the background worker and the callbacks
(the evaluation and saves it runs are covered through training in test_train.py)."""

import threading
import time

import pytest

from unet_jax.epoch_end import Background, EpochCallbacks


def test_background_jobs_run_in_order_off_the_caller_thread_and_errors_reach_wait():
    background = Background()
    done, threads = [], []

    def job(n, seconds):
        time.sleep(seconds)
        threads.append(threading.current_thread().name)
        done.append(n)

    background.submit(job, 1, 0.2)
    assert done == []  # submit returns before the job is done
    background.submit(job, 2, 0.0)  # waits for job 1 first: at most one pending
    background.wait()
    assert done == [1, 2]
    assert all(name.startswith("unet_jax_epoch_end") for name in threads)
    assert background.busy_s >= 0.2 and background.waited_s > 0.0

    def fails():
        raise OSError("disk full")

    background.submit(fails)
    with pytest.raises(OSError, match="disk full"):
        background.wait()
    background.wait()  # reported once
    background.close()


class _Saved:
    last_eval: dict = {}


def test_callbacks_come_once_the_epoch_is_complete_in_order():
    calls = []
    saved = _Saved()
    callbacks = EpochCallbacks(lambda epoch, last: calls.append((epoch, last.get("step"))), saved)
    callbacks.ended(1, complete=True)  # an epoch without evaluation: at once
    assert calls == [(1, None)]
    saved.last_eval = {"step": 8}
    callbacks.ended(2, complete=False)  # its evaluation runs in the background
    callbacks.ended(3, complete=False)
    assert calls == [(1, None)]
    callbacks.run()  # the background job is done
    assert calls == [(1, None), (2, 8), (3, 8)]
    EpochCallbacks(None, saved).ended(4, complete=True)  # no function: nothing to call
