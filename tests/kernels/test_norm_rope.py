"""`rms_norm` and `rms_norm_rope` against their eager references, and the references against the model's modules."""

import pytest
import torch

from cosmos3.kernels import norm_rope, rms_norm, rms_norm_reference, rms_norm_rope, rms_norm_rope_reference
from cosmos3.models.transformer_cosmos3 import (
    Cosmos3NemotronRMSNorm,
    Cosmos3RMSNorm,
    Cosmos3RotaryEmbedding,
    apply_rope,
)

from .conftest import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# [N, H, D]: one head of two, the tiny preset (16), a non-power-of-two head (12, the model tests' config), the Tiny
# model (64) and the published models (128).
QK_SHAPES = [(1, 1, 2), (7, 4, 16), (5, 3, 12), (9, 2, 64), (3, 8, 128)]


def make(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def make_weight(dim, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(dim, generator=g)).to(device=device, dtype=dtype)


def rope_tables(n, dim, dtype, device):
    """cos/sin as the model builds them (rotate-half layout, interleaved mRoPE slots)."""
    axes = [dim // 4, dim // 8, dim // 2 - dim // 4 - dim // 8]
    rotary = Cosmos3RotaryEmbedding(dim, 10000.0, axes).to(device)
    positions = torch.stack([torch.arange(n), torch.arange(n) % 3, torch.arange(n) % 5]).float().to(device)
    return rotary(positions, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The references compute what the model's modules compute (bit for bit)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_cls, kind", [(Cosmos3RMSNorm, "rms"), (Cosmos3NemotronRMSNorm, "nemotron")])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_reference_is_the_model_norm(module_cls, kind, x_dtype, w_dtype):
    norm = module_cls(16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(make_weight(16, torch.float32, "cpu"))
    norm = norm.to(w_dtype)
    x = make((5, 3, 16), x_dtype, "cpu")
    expected = norm(x)
    assert torch.equal(rms_norm_reference(x, norm.weight, 1e-6, kind=kind), expected)
    cos, sin = rope_tables(5, 16, x_dtype, "cpu")
    assert torch.equal(rms_norm_rope_reference(x, norm.weight, cos, sin, eps=1e-6, kind=kind),
                       apply_rope(expected, cos, sin))


def test_model_rope_is_rotate_half():
    """The kernel pairs element j with j + D/2 (not 2j with 2j+1); pin that convention on the model's function."""
    x = torch.randn(2, 1, 8)
    cos, sin = torch.zeros(2, 8), torch.ones(2, 8)
    assert torch.equal(apply_rope(x, cos, sin), torch.cat([-x[..., 4:], x[..., :4]], dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Kernels against the references
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", QK_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "nemotron"])
def test_rms_norm_rope_matches_reference(shape, dtype, kind, device, kernels_launch):
    n, _, dim = shape
    x = make(shape, dtype, device)
    weight = make_weight(dim, dtype, device)
    cos, sin = rope_tables(n, dim, dtype, device)
    expected = rms_norm_rope_reference(x, weight, cos, sin, eps=1e-6, kind=kind)
    assert_close(rms_norm_rope(x, weight, cos, sin, eps=1e-6, kind=kind), expected, exact_fraction=0.9)


@pytest.mark.parametrize("kind", ["rms", "nemotron"])
@pytest.mark.parametrize("x_dtype, w_dtype, rope_dtype", [
    (torch.bfloat16, torch.float32, torch.bfloat16),  # fp32 norm weights in a bf16 model: fp32 out of the RMS norm
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.float16, torch.float32, torch.float32),
])
def test_rms_norm_rope_mixed_dtypes(kind, x_dtype, w_dtype, rope_dtype, device, kernels_launch):
    x = make((6, 2, 16), x_dtype, device)
    weight = make_weight(16, w_dtype, device)
    cos, sin = make((6, 16), rope_dtype, device, seed=2, scale=1.0), make((6, 16), rope_dtype, device, seed=3)
    expected = rms_norm_rope_reference(x, weight, cos, sin, eps=1e-5, kind=kind)
    assert_close(rms_norm_rope(x, weight, cos, sin, eps=1e-5, kind=kind), expected, exact_fraction=0.9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_without_norm(dtype, device, kernels_launch):
    """Edge's text q/k: no norm, RoPE alone (general cos/sin, not only the duplicated-halves layout)."""
    x = make((5, 3, 12), dtype, device)
    cos, sin = make((5, 12), dtype, device, seed=2, scale=1.0), make((5, 12), dtype, device, seed=3, scale=1.0)
    assert_close(rms_norm_rope(x, None, cos, sin), rms_norm_rope_reference(x, None, cos, sin), exact_fraction=1.0)


def test_rms_norm_rope_strided_inputs(device, kernels_launch):
    """Heads that are not adjacent in memory (a slice of a wider projection) and broadcast cos/sin rows."""
    wide = make((4, 3, 32), torch.float32, device)
    x = wide[..., :16]
    assert not x.is_contiguous()
    weight = make_weight(16, torch.float32, device)
    cos, sin = (t[:1].expand(4, -1) for t in rope_tables(4, 16, torch.float32, device))
    expected = rms_norm_rope_reference(x, weight, cos, sin, eps=1e-6)
    assert_close(rms_norm_rope(x, weight, cos, sin, eps=1e-6), expected)


def test_rms_norm_rope_empty(device, kernels_launch):
    x = make((0, 2, 16), torch.bfloat16, device)
    cos, sin = rope_tables(0, 16, torch.bfloat16, device)
    out = rms_norm_rope(x, make_weight(16, torch.bfloat16, device), cos, sin)
    assert out.shape == (0, 2, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(1,), (7, 64), (2, 5, 48), (3, 1000), (4, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "nemotron"])
def test_rms_norm_matches_reference(shape, dtype, kind, device, kernels_launch):
    x = make(shape, dtype, device)
    weight = make_weight(shape[-1], dtype, device)
    expected = rms_norm_reference(x, weight, 1e-6, kind=kind)
    assert_close(rms_norm(x, weight, 1e-6, kind=kind), expected, exact_fraction=0.9)


@pytest.mark.parametrize("kind", ["rms", "nemotron"])
def test_rms_norm_fp32_weight_on_half_input(kind, device, kernels_launch):
    x = make((5, 40), torch.bfloat16, device)
    weight = make_weight(40, torch.float32, device)
    out = rms_norm(x, weight, 1e-6, kind=kind)
    assert out.dtype == (torch.float32 if kind == "rms" else torch.bfloat16)
    assert_close(out, rms_norm_reference(x, weight, 1e-6, kind=kind))


def test_rms_norm_transposed_input(device, kernels_launch):
    x = make((48, 6), torch.float32, device).T  # rows are not contiguous
    weight = make_weight(48, torch.float32, device)
    assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


def test_kernels_run_rather_than_the_reference(monkeypatch, device, kernels_launch):
    def fail(*args, **kwargs):
        raise AssertionError("the eager fallback ran")

    x = make((3, 2, 16), torch.float32, device)
    weight = make_weight(16, torch.float32, device)
    cos, sin = rope_tables(3, 16, torch.float32, device)
    monkeypatch.setattr(norm_rope, "rms_norm_reference", fail)
    monkeypatch.setattr(norm_rope, "rms_norm_rope_reference", fail)
    rms_norm(x, weight, 1e-6)
    rms_norm_rope(x, weight, cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# Fallback and input checks
# ---------------------------------------------------------------------------------------------------------------


def test_fallback_is_the_reference(monkeypatch):
    """Where no kernel can launch (no Triton, or CPU without the interpreter) the wrappers return the reference."""
    monkeypatch.setattr(norm_rope, "can_launch", lambda kernel, x: False)
    x = make((4, 2, 16), torch.bfloat16, "cpu")
    weight = make_weight(16, torch.bfloat16, "cpu")
    cos, sin = rope_tables(4, 16, torch.bfloat16, "cpu")
    for kind in ("rms", "nemotron"):
        assert torch.equal(rms_norm_rope(x, weight, cos, sin, eps=1e-6, kind=kind),
                           rms_norm_rope_reference(x, weight, cos, sin, eps=1e-6, kind=kind))
        assert torch.equal(rms_norm(x, weight, 1e-6, kind=kind), rms_norm_reference(x, weight, 1e-6, kind=kind))


def test_without_triton_nothing_launches(monkeypatch):
    from cosmos3.kernels import _triton

    monkeypatch.setattr(_triton, "triton", None)
    assert not _triton.can_launch(norm_rope._rms_norm_rope_kernel, torch.empty(1))
    assert not _triton.interpreted(norm_rope._rms_norm_rope_kernel)


X = torch.randn(3, 2, 8)
W = torch.ones(8)
COS = torch.randn(3, 8)


@pytest.mark.parametrize("call, error, match", [
    (lambda: rms_norm_rope(X[0], W, COS, COS), ValueError, r"`x` must be 3-D, got shape \(2, 8\)"),
    (lambda: rms_norm_rope(X.double(), W, COS, COS), TypeError, r"`x` has dtype torch.float64; supported: "),
    (lambda: rms_norm_rope(X.int(), W, COS, COS), TypeError, r"`x` has dtype torch.int32"),
    (lambda: rms_norm_rope(X.numpy(), W, COS, COS), TypeError, r"`x` must be a torch.Tensor, got ndarray"),
    (lambda: rms_norm_rope(torch.randn(3, 2, 7), torch.ones(7), COS[:, :7], COS[:, :7]), ValueError,
     r"head_dim must be even"),
    (lambda: rms_norm_rope(X, W, COS[:2], COS[:2]), ValueError, r"`cos` must have shape \(N, D\) = \(3, 8\)"),
    (lambda: rms_norm_rope(X, W, COS, COS.half()), TypeError, r"`cos` and `sin` must share a dtype"),
    (lambda: rms_norm_rope(X, torch.ones(4), COS, COS), ValueError, r"`weight` has shape \(4,\)"),
    (lambda: rms_norm_rope(X, W, COS, COS, eps=0.0), ValueError, r"`eps` must be a positive finite number, got 0.0"),
    (lambda: rms_norm_rope(X, W, COS, COS, kind="layer"), ValueError, r"`kind` must be one of .* got 'layer'"),
    (lambda: rms_norm_rope(X, W, COS, COS.to("meta")), ValueError, r"`sin` is on meta but the input is on cpu"),
    (lambda: rms_norm(torch.tensor(1.0), W, 1e-6), ValueError, r"at least one dim"),
    (lambda: rms_norm(X, torch.ones(3), 1e-6), ValueError, r"`weight` has shape \(3,\) but x's last dim is 8"),
    (lambda: rms_norm(X, W.double(), 1e-6), TypeError, r"`weight` has dtype torch.float64"),
    (lambda: rms_norm(X, W, float("nan")), ValueError, r"`eps` must be a positive finite number, got nan"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
