"""Where the stages compute: the device a stage uses when it is not given one."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The GPU when there is one (the paper-scale models need it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
