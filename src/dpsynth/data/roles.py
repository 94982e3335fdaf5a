"""The roles of a split (public, private, test) as its manifest records them: how
`prepare` marks the splits it writes, and how the stages that must only read
public data refuse the private one."""

from __future__ import annotations

from pathlib import Path

from dpsynth.errors import InputError
from dpsynth.io.shards import Manifest

ROLES = ("public", "private", "test")


def carved_source(pool_source: str, role: str, seed: int) -> str:
    """The manifest `source` of a split carved out of a pool: it names the role for
    people reading the manifest (the stages read its `role` field)."""
    return f"{pool_source} {role} (stratified, seed {seed})"


def is_private(manifest: Manifest) -> bool:
    """Whether `manifest` is of the private split `prepare` wrote.

    Its `role` says so. Manifests written before dpsynth recorded the role have
    none: for them, the private split is told by its `source`, which `prepare`
    has always written as `carved_source(..., "private", ...)` (every private
    split is carved from the pool, even when the public and test splits come
    from their own sources).
    """
    if manifest.role is not None:
        return manifest.role == "private"
    return " private (stratified" in manifest.source  # a manifest without a role


def refuse_private_split(name: str, data_dir: str | Path, manifest: Manifest, why: str) -> None:
    """Refuse a folder that `prepare` marked private where only public data may go.

    Args:
        name: the argument that named the folder (e.g. `public_dir`), for the message.
        data_dir: the folder.
        manifest: its manifest.
        why: what the public split is used for, e.g. "pre-training is not private".

    Raises:
        InputError: naming the folder and the fix (pass artifacts/prepare/public).
    """
    if is_private(manifest):
        raise InputError(f"{name}={str(data_dir)!r} is the PRIVATE split (its manifest's role, "
                         f"source {manifest.source!r}, as `dpsynth prepare` marks it); {why}: "
                         "pass the public split, artifacts/prepare/public")
