"""Host <-> device copies that do not make the host wait for work queued after them."""

from __future__ import annotations

import time

import pytest
import torch

from chitu_core.engine.host_copy import HostCopy, PinnedPool, to_device_async


def test_cpu_tensors_pass_through():
    values = torch.arange(6).view(2, 3)
    assert torch.equal(to_device_async(values, torch.device("cpu")), values)
    assert torch.equal(HostCopy(values).get(), values)


class _Event:
    """Stand-in for a CUDA event: done when the test says so; synchronize() finishes it."""

    def __init__(self) -> None:
        self.done, self.waited = False, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


def test_pinned_pool_reuses_a_slot_only_after_its_copy_completed():
    pool = PinnedPool(slot_bytes=64, num_slots=2)
    pool._buffer = torch.zeros(128, dtype=torch.uint8)  # stands in for the pinned block
    assert pool.acquire(65) is None  # larger than a slot: the caller pins its own memory
    a, b = pool.acquire(64), pool.acquire(8)
    assert {a, b} == {0, 1}
    staged = pool.view(b, torch.zeros(2, dtype=torch.int64))
    staged.copy_(torch.tensor([5, -6]))
    assert pool._buffer[b * 64 : b * 64 + 16].view(torch.int64).tolist() == [5, -6]
    first, second = _Event(), _Event()
    pool.release_after(a, first)
    pool.release_after(b, second)
    second.done = True  # completed out of order: slots come back oldest first
    # Every slot is in flight: the oldest copy is waited for, its slot handed out.
    assert pool.acquire(8) == a and first.waited and not second.waited
    assert pool.acquire(8) == b and not second.waited  # already complete: no wait
    assert pool.acquire(8) is None  # both held by readers (HostCopy before get())
    pool.release(a)
    assert pool.acquire(8) == a


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU"
)
def test_cuda_copies_do_not_wait_for_later_work():
    device = torch.device("cuda", torch.cuda.current_device())
    tokens = torch.arange(32, device=device) * 3
    copy = HostCopy(tokens)
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued after the copy
    start = time.perf_counter()
    values = copy.get().tolist()
    uploaded = to_device_async(torch.arange(5), device)
    host_s = time.perf_counter() - start
    pending = not torch.cuda.current_stream().query()
    assert values == [3 * i for i in range(32)]
    # The host read the copy and queued the upload while the sleep still ran.
    assert pending and host_s < 0.5, (pending, host_s)
    torch.cuda.synchronize()
    assert uploaded.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA GPU"
)
def test_cuda_copies_through_more_than_the_pool_holds_stay_correct():
    """Three times as many copies in flight as the pool has slots, both directions, with
    the device busy: every value arrives (slots are reused only after their copy)."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda._sleep(200_000_000)
    ups = [to_device_async(torch.full((1000,), i), device) for i in range(96)]
    downs = [HostCopy(u * 2) for u in ups]
    big = to_device_async(torch.arange(100_000), device)  # larger than a slot
    assert [d.get()[0].item() for d in downs] == [2 * i for i in range(96)]
    assert all(d.get().eq(2 * i).all() for i, d in enumerate(downs))
    assert torch.equal(big.cpu(), torch.arange(100_000))


def test_pinned_pool_lock_is_reentrant_for_finalizers():
    """HostCopy.__del__ may run (garbage collection) while the same thread is inside
    acquire(): releasing a slot there must not deadlock on the pool's lock."""
    import threading

    pool = PinnedPool(slot_bytes=64, num_slots=2)
    pool._buffer = torch.zeros(128, dtype=torch.uint8)
    done = threading.Event()

    def nested():
        with pool._lock:  # as if inside acquire()
            pool.release_after(pool.acquire(8), _Event())
        done.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert done.is_set(), "release inside the pool's lock deadlocked"
