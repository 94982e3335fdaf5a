"""Fixtures for the data tests: the builders of `raw_formats` in `tmp_path`, and a
check that a failing `prepare` leaves nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from raw_formats import (cifar_members, write_camelyon17, write_imagefolder,
                         write_imagenet32, write_tarball)

from dpsynth.config import Config, DataConfig, SourceConfig
from dpsynth.errors import InputError
from dpsynth.stages import prepare
from dpsynth.tracking import NullTracker


@pytest.fixture
def cifar_tarball(tmp_path: Path) -> Path:
    """A real 20-image `cifar-10-python.tar.gz`: 5 x 2 train, 10 test."""
    return write_tarball(tmp_path / "cifar-10-python.tar.gz", cifar_members())


@pytest.fixture
def imagenet32_dir(tmp_path: Path) -> Path:
    return write_imagenet32(tmp_path / "imagenet32")


@pytest.fixture
def camelyon_dir(tmp_path: Path) -> Path:
    return write_camelyon17(tmp_path / "camelyon17_v1.0")


@pytest.fixture
def imagefolder_dir(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "folder")


@pytest.fixture
def prepare_fails(tmp_path: Path) -> Callable[..., InputError]:
    """Run `prepare` with one source in a role; assert it raises InputError matching
    `match` and leaves neither the output folder nor a `.tmp-` folder behind."""

    def check(spec: SourceConfig, match: str, role: str = "private",
              **data: object) -> InputError:
        out_dir = tmp_path / "artifacts" / "prepare"
        cfg = Config(data=DataConfig(**{role: spec}, **data))  # type: ignore[arg-type]
        with pytest.raises(InputError, match=match) as info:
            prepare.run(cfg, out_dir=out_dir, tracker=NullTracker())
        assert not out_dir.exists()
        parent = out_dir.parent
        assert not parent.exists() or not any(".tmp-" in p.name for p in parent.iterdir())
        return info.value

    return check
