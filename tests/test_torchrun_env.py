"""`dpsynth.devices`: torchrun's environment is read in one place, and each torchrun
worker trains on its own GPU. (The stages on each device: tests/stages/test_devices.py.)"""

from __future__ import annotations

import pytest
import torch

from dpsynth import drive
from dpsynth.devices import TorchrunProcess, default_device, torchrun_process, training_device
from dpsynth.training.workers import Workers


def test_outside_torchrun_the_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_process() == TorchrunProcess(0, 0, 1)
    assert drive.is_main_process()
    assert Workers.from_env() == Workers(0, 1)  # no process group to join


def test_torchrun_variables_are_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_process() == TorchrunProcess(rank=5, local_rank=1, world_size=8)
    assert not torchrun_process().is_main and not drive.is_main_process()
    # a bare "cuda" is this worker's GPU; an explicit device or the CPU is kept
    assert training_device("cuda") == torch.device("cuda", 1)
    assert training_device("cuda:0") == torch.device("cuda", 0)
    assert training_device("cpu") == torch.device("cpu")


def test_one_process_keeps_the_device_it_is_given() -> None:
    one = TorchrunProcess()
    assert training_device("cuda", one) == torch.device("cuda")
    assert training_device(None, one) == default_device()


def test_a_single_torchrun_worker_is_launched_and_trains_on_its_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun with one worker (one GPU): a group of one is joined (NCCL runs), and a
    bare "cuda" is the worker's LOCAL_RANK."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                        ("TORCHELASTIC_RUN_ID", "none")):
        monkeypatch.setenv(name, value)
    assert torchrun_process() == TorchrunProcess(0, 0, 1, launched=True)
    assert training_device("cuda") == torch.device("cuda", 0)
