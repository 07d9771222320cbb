"""The server's memo of counted training steps (modules/lora_training/estimate CountedSteps)."""

import threading
import time

import pytest

from modules.lora_training.estimate import CountedSteps


def test_two_askers_at_once_count_once_and_share_the_result():
    counted = CountedSteps()
    calls, results = [], []

    def count():
        calls.append(1)
        time.sleep(0.2)
        return object()

    threads = [threading.Thread(target=lambda: results.append(counted.work(("m", 1), count))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and counted.counts == 1
    assert len(results) == 3 and results[0] is results[1] is results[2]


def test_a_failed_count_is_not_kept_and_the_oldest_entry_makes_room():
    counted = CountedSteps(keep=2)

    def fail():
        raise ValueError("no model")

    with pytest.raises(ValueError):
        counted.work(("m", 1), fail)
    first = counted.work(("m", 1), object)
    assert counted.work(("m", 1), fail) is first, "kept: not counted again"
    counted.work(("m", 2), object)
    counted.work(("m", 3), object)
    assert counted.work(("m", 1), object) is not first, "the oldest left to make room"
    assert counted.counts == 4
