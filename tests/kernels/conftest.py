import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels_launch(device):
    """Skip without Triton; fail if the kernels would silently fall back to eager (that would test nothing)."""
    pytest.importorskip("triton", reason="Triton is not installed (the `test` extra pins it); kernel tests skipped")
    from cosmos3.kernels._triton import can_launch
    from cosmos3.kernels.norm_rope import _rms_norm_rope_kernel

    if not can_launch(_rms_norm_rope_kernel, torch.empty(0, device=device)):
        pytest.fail("Triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first); the "
                    "kernels cannot run on CPU.")


def assert_close(actual, expected, *, exact_fraction: float | None = None):
    """Per-dtype tolerances: fp32 to reduction-order noise, half precision to one rounding step of the output.

    `exact_fraction`: for half precision, the share of elements that must match bit for bit (the kernels round
    where eager code rounds, so only the fp32 reduction order can flip a result).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)
    if exact_fraction is not None and expected.dtype != torch.float32 and expected.numel():
        assert (actual == expected).float().mean().item() >= exact_fraction
