"""training/precision.py: exact_float32 turns TF32 off for cuDNN convolutions and
CUDA matmuls inside, and restores the caller's settings after, on error too."""

from __future__ import annotations

import pytest
import torch

from dpsynth.training.precision import exact_float32


def settings() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


@pytest.mark.parametrize("caller", [("tf32", "tf32"), ("tf32", "ieee"), ("ieee", "tf32")])
def test_exact_float32_is_ieee_inside_and_restores_the_callers_settings(
        caller: tuple[str, str]) -> None:
    before = settings()
    try:
        (torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cuda.matmul.fp32_precision) = caller
        with exact_float32():
            assert settings() == ("ieee", "ieee")
            with exact_float32():  # nested: still exact, and the outer one restores
                pass
            assert settings() == ("ieee", "ieee")
        assert settings() == caller
        with pytest.raises(RuntimeError, match="inside"), exact_float32():
            raise RuntimeError("inside")
        assert settings() == caller
    finally:
        (torch.backends.cudnn.conv.fp32_precision,
         torch.backends.cuda.matmul.fp32_precision) = before
