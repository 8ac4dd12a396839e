"""Host <-> device copies that do not make the host wait for work queued after them."""

from __future__ import annotations

import time

import pytest
import torch

from chitu_core.engine.host_copy import HostCopy, to_device_async


def test_cpu_tensors_pass_through():
    values = torch.arange(6).view(2, 3)
    assert torch.equal(to_device_async(values, torch.device("cpu")), values)
    assert torch.equal(HostCopy(values).get(), values)


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
