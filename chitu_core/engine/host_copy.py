"""Copies between the host and a device that do not make the host wait for the device.

A copy from pageable host memory, or back into it, is ordered after everything
queued on the device before it: the host waits until the device has drained. When
the engine queues the next decode step before reading the last one's tokens, both
copies must go through pinned (page-locked) memory instead, with the read-back
queued before the next step and awaited on its own event. Pinned blocks come from
PyTorch's caching host allocator, which reuses a block only once the copies that
used it have completed. Devices other than CUDA take the plain (synchronous) path.
"""

from __future__ import annotations

import torch


def to_device_async(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (a CPU tensor) on ``device``; on CUDA the copy is queued, the host goes on."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """``tensor`` (on a device) copied to the host by a copy queued now; ``get()`` waits
    for that copy alone, not for work queued on the device after it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        if tensor.device.type != "cuda":
            self._host = tensor  # read (and waited for) by get()
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> torch.Tensor:
        """The copy, on the CPU."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.cpu()
