"""Where the stages compute: the device a stage uses when it is not given one, and
this process's place among torchrun's workers (the one place dpsynth reads
torchrun's environment variables)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch


def default_device() -> torch.device:
    """The GPU when there is one (the paper-scale models need it), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class TorchrunProcess:
    """This process's place among the workers `torchrun` started; outside torchrun,
    the one process: rank 0 of 1.

    Attributes:
        rank: the global rank (`RANK`): rank 0 alone reports, saves and publishes.
        local_rank: the rank on this machine (`LOCAL_RANK`): the GPU it trains on.
        world_size: the number of workers (`WORLD_SIZE`).
        launched: started by torchrun (`TORCHELASTIC_RUN_ID` set), whatever the
            world size: then it joins a process group, even as the only worker.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_process(env: Mapping[str, str] | None = None) -> TorchrunProcess:
    """This process's `TorchrunProcess`, from `env` (default `os.environ`).

    >>> torchrun_process({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
    ...                   "TORCHELASTIC_RUN_ID": "none"})
    TorchrunProcess(rank=3, local_rank=1, world_size=4, launched=True)
    >>> torchrun_process({}).is_main
    True
    """
    env = os.environ if env is None else env
    return TorchrunProcess(rank=int(env.get("RANK", "0")),
                           local_rank=int(env.get("LOCAL_RANK", "0")),
                           world_size=int(env.get("WORLD_SIZE", "1")),
                           launched="TORCHELASTIC_RUN_ID" in env)


def training_device(device: str | torch.device | None,
                    process: TorchrunProcess | None = None) -> torch.device:
    """`device`, default `default_device()`; under torchrun a bare "cuda" is this
    worker's own GPU (`LOCAL_RANK`): one GPU per worker.

    >>> training_device("cuda", TorchrunProcess(rank=5, local_rank=1, world_size=8))
    device(type='cuda', index=1)
    >>> training_device("cpu", TorchrunProcess(rank=5, local_rank=1, world_size=8))
    device(type='cpu')
    """
    device = torch.device(device) if device is not None else default_device()
    process = torchrun_process() if process is None else process
    if device.type == "cuda" and device.index is None and (process.world_size > 1
                                                           or process.launched):
        device = torch.device("cuda", process.local_rank)
    return device
