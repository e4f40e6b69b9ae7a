"""`silu_glu` against its eager reference, and the reference against `Cosmos3MLP`."""

import pytest
import torch

from cosmos3.kernels import glu, silu_glu, silu_glu_reference
from cosmos3.models.transformer_cosmos3 import Cosmos3MLP

from .conftest import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_the_model_mlp(dtype):
    torch.manual_seed(0)
    mlp = Cosmos3MLP(16, 40, "silu").to(dtype)
    x = make((5, 16), dtype, "cpu", scale=1.0)
    with torch.no_grad():
        expected = mlp(x)
        assert torch.equal(mlp.down_proj(silu_glu_reference(mlp.gate_proj(x), mlp.up_proj(x))), expected)


# Sizes around the 1024-element block: below, exactly at, just past, and a many-block tensor.
@pytest.mark.parametrize("shape", [(1,), (8, 128), (1025,), (3, 7, 300), (64, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_glu_matches_reference(shape, dtype, device, kernels_launch):
    gate, up = make(shape, dtype, device), make(shape, dtype, device, seed=1)
    assert_close(silu_glu(gate, up), silu_glu_reference(gate, up), exact_fraction=0.99)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
def test_silu_glu_extremes(device, kernels_launch):
    """Saturated gates: silu(x) -> x for large x and -> 0 (not NaN) for very negative x."""
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=device)
    up = torch.full_like(gate, 2.0)
    assert_close(silu_glu(gate, up), silu_glu_reference(gate, up))


def test_silu_glu_non_contiguous(device, kernels_launch):
    both = make((6, 2, 50), torch.bfloat16, device)
    gate, up = both[:, 0], both[:, 1]  # halves of one fused projection
    assert not gate.is_contiguous()
    assert_close(silu_glu(gate, up), silu_glu_reference(gate, up), exact_fraction=0.99)


def test_silu_glu_empty(device, kernels_launch):
    gate = torch.empty(0, 8, device=device, dtype=torch.float16)
    assert silu_glu(gate, gate).shape == (0, 8)


def test_kernel_runs_rather_than_the_reference(monkeypatch, device, kernels_launch):
    def fail(*args):
        raise AssertionError("the eager fallback ran")

    monkeypatch.setattr(glu, "silu_glu_reference", fail)
    silu_glu(make((4, 8), torch.float32, device), make((4, 8), torch.float32, device))


def test_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(glu, "can_launch", lambda kernel, x: False)
    gate, up = make((5, 33), torch.bfloat16, "cpu"), make((5, 33), torch.bfloat16, "cpu", seed=1)
    assert torch.equal(silu_glu(gate, up), silu_glu_reference(gate, up))


G = torch.randn(4, 8)


@pytest.mark.parametrize("call, error, match", [
    (lambda: silu_glu(G, G[:3]), ValueError, r"`gate` and `up` must have one shape, got \(4, 8\) and \(3, 8\)"),
    (lambda: silu_glu(G, G.half()), TypeError, r"`gate` and `up` must share a dtype"),
    (lambda: silu_glu(G.double(), G.double()), TypeError, r"`gate` has dtype torch.float64; supported: "),
    (lambda: silu_glu(G, [1.0]), TypeError, r"`up` must be a torch.Tensor, got list"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
