"""Copies between the host and a device that do not make the host wait for the device.

A copy from pageable host memory, or back into it, is ordered after everything
queued on the device before it: the host waits until the device has drained. When
the engine queues the next decode step before reading the last one's tokens, both
copies must go through pinned (page-locked) memory instead, with the read-back
queued before the next step and awaited on its own event.

Pinned staging comes from a pool of fixed slots allocated once per process
(``PinnedPool``): ``Tensor.pin_memory()`` and ``torch.empty(pin_memory=True)`` cost
a pointer query and a trip through the caching host allocator on every call (about
0.2 ms each under torch.profiler on an H200 host, several per decode step). A slot
is reused only once the copy that used it has completed (its CUDA event). Copies
larger than a slot take the allocator's path. Devices other than CUDA take the
plain (synchronous) path.
"""

from __future__ import annotations

import collections
import threading

import torch

SLOT_BYTES = 256 * 1024  # a decode step's payload at batch 256 with long contexts fits
NUM_SLOTS = 32  # several steps' copies in flight (a step queues up to ~8)


class PinnedPool:
    """``num_slots`` page-locked slots of ``slot_bytes`` each, reused once the copy that
    used a slot is done. Thread-safe; allocated on first use."""

    def __init__(self, slot_bytes: int = SLOT_BYTES, num_slots: int = NUM_SLOTS) -> None:
        self.slot_bytes, self.num_slots = slot_bytes, num_slots
        self._buffer: torch.Tensor | None = None
        self._free: list[int] = list(range(num_slots))
        self._in_flight: collections.deque[tuple[int, torch.cuda.Event]] = collections.deque()
        # Re-entrant: a HostCopy collected by the garbage collector while this thread is
        # inside acquire() releases its slot from __del__ through the same lock.
        self._lock = threading.RLock()

    def acquire(self, nbytes: int) -> int | None:
        """A free slot for ``nbytes``, or None if they do not fit a slot or every slot is
        held by a reader (then the caller allocates its own pinned memory)."""
        if nbytes > self.slot_bytes:
            return None
        with self._lock:
            if self._buffer is None:
                self._buffer = torch.empty(
                    self.slot_bytes * self.num_slots, dtype=torch.uint8, pin_memory=True
                )
            while self._in_flight and self._in_flight[0][1].query():
                self._free.append(self._in_flight.popleft()[0])
            if not self._free and self._in_flight:  # all busy: the oldest copy is nearly done
                slot, event = self._in_flight.popleft()
                event.synchronize()
                self._free.append(slot)
            return self._free.pop() if self._free else None

    def view(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        """Slot ``slot`` as a tensor of ``like``'s dtype and shape."""
        nbytes = like.numel() * like.element_size()
        start = slot * self.slot_bytes
        return self._buffer[start : start + nbytes].view(like.dtype).view(like.shape)

    def release_after(self, slot: int, event: torch.cuda.Event) -> None:
        """``slot`` is free again once ``event`` (recorded after its copy) has completed."""
        with self._lock:
            self._in_flight.append((slot, event))

    def release(self, slot: int) -> None:
        """``slot`` is free again now (its copy is complete and read)."""
        with self._lock:
            self._free.append(slot)


_POOL = PinnedPool()


def _record(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def to_device_async(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (a CPU tensor) on ``device``; on CUDA the copy is queued, the host goes on."""
    if device.type != "cuda":
        return values.to(device)
    slot = _POOL.acquire(values.numel() * values.element_size())
    if slot is None:
        return values.pin_memory().to(device, non_blocking=True)
    staged = _POOL.view(slot, values)
    staged.copy_(values)
    out = staged.to(device, non_blocking=True)
    _POOL.release_after(slot, _record(device))
    return out


class HostCopy:
    """``tensor`` (on a device) copied to the host by a copy queued now; ``get()`` waits
    for that copy alone, not for work queued on the device after it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        self._slot = None
        if tensor.device.type != "cuda":
            self._host = tensor  # read (and waited for) by get()
            return
        self._slot = _POOL.acquire(tensor.numel() * tensor.element_size())
        if self._slot is None:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        else:
            self._host = _POOL.view(self._slot, tensor)
        self._host.copy_(tensor, non_blocking=True)
        self._event = _record(tensor.device)

    def get(self) -> torch.Tensor:
        """The copy, on the CPU (a tensor of its own: the staging slot is reused)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
            if self._slot is not None:  # the pool's slot: copy out, then hand it back
                self._host = self._host.clone()
                _POOL.release(self._slot)
                self._slot = None
        return self._host.cpu()

    def __del__(self) -> None:
        # Dropped unread (e.g. a failed step): the slot is free once the copy is done.
        if getattr(self, "_slot", None) is not None and self._event is not None:
            _POOL.release_after(self._slot, self._event)
