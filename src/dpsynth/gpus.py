"""Named GPUs for compute estimates: peak dense throughput and memory, from
their datasheets, and the GPU-hours a number of FLOPs takes at an assumed
utilisation. No torch import: `dpsynth --help` lists the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Precision = Literal["tf32", "bf16"]


@dataclass(frozen=True)
class Device:
    """A GPU's dense peak throughput (no 2:4 sparsity) and memory.

    Attributes:
        tflops: peak dense TFLOPS by precision. "tf32": training in float32
            (`precision: fp32`; cuDNN runs convolutions, most of the UNet's FLOPs,
            in TF32 by default on Ampere and newer); "bf16": bfloat16 autocast
            (`precision: bf16`).
        memory_gb: device memory in GB (10^9 bytes, as datasheets state it).
    """

    name: str
    tflops: dict[str, float]
    memory_gb: float


# Datasheet figures; NVIDIA quotes TF32/BF16 "with sparsity", so dense = half of it.
DEVICES: dict[str, Device] = {d.name: d for d in (
    # NVIDIA A100 Tensor Core GPU datasheet: TF32 156, BF16 312 TFLOPS dense (SXM)
    Device("A100-40GB", {"tf32": 156.0, "bf16": 312.0}, 40.0),
    Device("A100-80GB", {"tf32": 156.0, "bf16": 312.0}, 80.0),
    # NVIDIA H100 datasheet, SXM: TF32 989 / BF16 1,979 with sparsity
    Device("H100-SXM", {"tf32": 494.5, "bf16": 989.5}, 80.0),
    # NVIDIA H200 datasheet, SXM: the same compute as H100 SXM, 141 GB HBM3e
    Device("H200", {"tf32": 494.5, "bf16": 989.5}, 141.0),
    # NVIDIA L4 datasheet: TF32 120 / BF16 242 with sparsity
    Device("L4", {"tf32": 60.0, "bf16": 121.0}, 24.0),
    # NVIDIA V100 datasheet, SXM2: no TF32 or BF16; FP32 15.7 and FP16 tensor 125
    Device("V100-32GB", {"tf32": 15.7, "bf16": 125.0}, 32.0),
)}
DEFAULT_DEVICE = "A100-80GB"
# Assumed model FLOPs utilisation (achieved FLOP/s over the peak above). Measured
# on one H200 (torch 2.11, float32 with cuDNN's TF32 convolutions, FLOPs counted
# by plan.unet_cost): the 80M-parameter CIFAR-10 UNet (configs/cifar10.yaml) at
# 32x32 reached 15% of TF32 peak in a non-private training step of 256 rows and
# 17% in sampling forwards of 500; the 1.1M-parameter 8x8 digits UNet 0.6% and
# 0.3% (its kernels are too small to fill the GPU). So: an assumption that fits
# paper-scale models; for small ones GPU-hours are a floor.
DEFAULT_MFU = 0.15
# The assumption by precision. bf16: the book-keeping DP step under bf16 autocast
# on the same H200 and model (torch 2.11, 32 x K=32 rows per micro-batch) reached
# 9.4-10.8% of the bf16 peak (93-107 TFLOP/s), its non-private bf16 step 16%;
# fine-tuning dominates a paper-scale run, so its figure, rounded up.
MFU_BY_PRECISION: dict[str, float] = {"tf32": DEFAULT_MFU, "bf16": 0.11}


def gpu_hours(flops: float, device: Device, precision: Precision, mfu: float) -> float:
    """FLOPs / (peak · MFU) in hours.

    >>> round(gpu_hours(1e21, DEVICES["A100-80GB"], "bf16", 0.5), 1)  # 1e21 / (156e12 * 3600)
    1780.6
    """
    return flops / (device.tflops[precision] * 1e12 * mfu) / 3600
