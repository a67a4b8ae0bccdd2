"""The multi-host stop agreement (`bf16jax.training.preemption.StopAgreement`) against a stand-in
for
JAX's coordination service: processes are threads running at different, random speeds, a signal
reaches one (or two) of them at a random moment; all must stop after the same tick, at or after
the tick each signalled process had reached. The real service is exercised by
tests/test_multihost.py (2 processes of the CLI); this file runs hundreds of races in a second.
"""

import random
import threading
import time

import pytest

from bf16jax.training.preemption import StopAgreement


class FakeCoordination:
    """What StopAgreement uses of `jax._src.distributed.global_state.client`: a key-value store
    and a reusable barrier (each round releases when every process has arrived)."""

    def __init__(self, processes: int):
        self.store: dict[str, str] = {}
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(processes)

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            assert allow_overwrite or key not in self.store
            self.store[key] = value

    def key_value_try_get(self, key: str) -> str:
        with self.lock:
            if key not in self.store:
                raise RuntimeError(f"NOT_FOUND: Config key {key} not found.")
            return self.store[key]

    def wait_at_barrier(self, barrier_id: str, timeout_in_ms: int) -> None:
        self.barrier.wait(timeout=timeout_in_ms / 1000)


def _race(seed: int, processes: int, every: int, signalled: list[int]) -> tuple[list, dict]:
    """Runs one race; returns each process's stop tick and the tick each signalled process had
    passed when its signal arrived."""
    rng = random.Random(seed)
    client = FakeCoordination(processes)
    # Same order on every process: one StopAgreement each, sharing the prefix of this race.
    agreements = [StopAgreement(client, p, every) for p in range(processes)]
    for a in agreements:
        a.prefix = agreements[0].prefix
    delays = [rng.choice([0.0, 0.0001, 0.0005, 0.002]) for _ in range(processes)]
    flags: dict[int, str] = {}
    ticks = [0] * processes
    passed_at_signal: dict[int, int] = {}
    stops: list = [None] * processes

    def run(p: int) -> None:
        for tick in range(1, 10_000):
            time.sleep(delays[p] * rng.random())  # a step, at this process's own pace
            ticks[p] = tick
            if agreements[p].decide(tick, flags.get(p)) is not None:
                stops[p] = tick
                return

    threads = [threading.Thread(target=run, args=(p,)) for p in range(processes)]
    for t in threads:
        t.start()
    time.sleep(rng.random() * 0.02)
    for p in signalled:
        passed_at_signal[p] = ticks[p]
        flags[p] = "SIGTERM"  # what the signal handler does
        time.sleep(rng.random() * 0.002)
    for t in threads:
        t.join(timeout=30)
    return stops, passed_at_signal


@pytest.mark.parametrize("every", [1, 3])
def test_every_process_stops_after_the_same_tick(every):
    rng = random.Random(every)
    for seed in range(60):
        processes = rng.choice([2, 3, 4])
        signalled = rng.sample(range(processes), rng.choice([1, 1, 2]))
        stops, passed = _race(seed, processes, every, signalled)
        assert None not in stops and len(set(stops)) == 1, (seed, stops)
        assert stops[0] % every == 0
        # No step a signalled process had finished is lost.
        assert stops[0] >= max(passed.values()), (seed, stops, passed)


def test_no_signal_no_stop_and_only_checked_ticks_cost():
    client = FakeCoordination(1)
    agreement = StopAgreement(client, 0, every=4)
    assert [agreement.decide(t, None) for t in range(1, 13)] == [None] * 12
    assert agreement.checks == 3 and client.store == {}
    assert agreement.decide(16, "SIGINT") == "process 0: SIGINT"
    with pytest.raises(ValueError, match="preemption_check_every=0 must be >= 1"):
        StopAgreement(client, 0, every=0)
