"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch

# Relative RMS error allowed per dtype (fla-style ratio-of-RMS check).
RMS_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_rms(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """``rms(actual - expected) <= tol * rms(expected)``, with NaN/inf placement identical."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{what}: NaN placement differs"
    finite = torch.isfinite(expected)
    assert bool((torch.isinf(actual) == torch.isinf(expected)).all()), f"{what}: inf placement differs"
    a, e = actual[finite], expected[finite]
    if e.numel() == 0:
        return
    err = torch.sqrt(torch.mean((a - e) ** 2))
    ref = torch.sqrt(torch.mean(e**2)).clamp(min=1e-6)
    tol = RMS_TOLERANCE[dtype]
    assert err <= tol * ref, f"{what}: relative RMS error {float(err / ref):.3g} > {tol:g}"


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``x`` filled with NaN: whatever a kernel fails to write shows up."""
    return torch.full_like(x, float("nan"))
