"""`make gpu-smoke`: the accelerator is visible and computes; deselected by `make test`."""

from __future__ import annotations

import pytest


@pytest.mark.gpu
def test_cuda_device_computes_a_matmul():
    torch = pytest.importorskip("torch")
    assert torch.cuda.is_available(), "make gpu-smoke needs a CUDA device"
    a = torch.randn(512, 512, device="cuda")
    expected = (a.cpu().double() @ a.cpu().double()).float()
    assert torch.allclose((a @ a).cpu(), expected, rtol=1e-3, atol=1e-2)
