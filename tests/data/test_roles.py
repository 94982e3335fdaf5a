"""The private split is told by its manifest's `role` (older manifests: by the
`source` text `prepare` has always written), and refused where only public data
may go."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpsynth.data.roles import carved_source, is_private, refuse_private_split
from dpsynth.errors import InputError
from dpsynth.io.shards import MANIFEST, read_manifest, write_dataset


def _split(tmp_path: Path, name: str, *, source: str, role: str | None) -> Path:
    images = np.zeros((4, 8, 8, 1), np.uint8)
    write_dataset(tmp_path / name, images, np.arange(4) % 2, ("a", "b"), source, role=role)
    return tmp_path / name


def test_the_role_field_decides(tmp_path: Path) -> None:
    private = _split(tmp_path, "p", source="hospital scans", role="private")
    # a public split whose source text happens to read like a carved private one
    public = _split(tmp_path, "q", source=carved_source("pool", "private", 0), role="public")
    assert json.loads((private / MANIFEST).read_text())["role"] == "private"
    assert is_private(read_manifest(private)) and not is_private(read_manifest(public))
    with pytest.raises(InputError, match=r"public_dir=.*is the PRIVATE split.*artifacts/"
                                         r"prepare/public"):
        refuse_private_split("public_dir", private, read_manifest(private), "not private")
    refuse_private_split("public_dir", public, read_manifest(public), "not private")


def test_a_manifest_without_a_role_falls_back_to_its_source(tmp_path: Path) -> None:
    old = _split(tmp_path, "old", source=carved_source("pool", "private", 3), role=None)
    other = _split(tmp_path, "syn", source="dpsynth-sample:abc", role=None)
    assert "role" not in json.loads((old / MANIFEST).read_text())  # schema as before
    assert is_private(read_manifest(old)) and not is_private(read_manifest(other))
