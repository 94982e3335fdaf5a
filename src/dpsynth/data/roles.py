"""The roles of a split (public, private, test) as its manifest records them: how
`prepare` marks a split it carved out of the private pool, and how the stages
that must only read public data refuse the private one."""

from __future__ import annotations

from pathlib import Path

from dpsynth.errors import InputError


def carved_source(pool_source: str, role: str, seed: int) -> str:
    """The manifest `source` of a split carved out of a pool: it names the role, so
    later stages can refuse the private split where only public data may go."""
    return f"{pool_source} {role} (stratified, seed {seed})"


def is_carved_private(source: str) -> bool:
    """Whether a manifest's `source` says `prepare` carved it as the private split.

    Every private split `prepare` writes is carved (`gather_splits`): `data.private`
    only ever supplies the pool, and the private role is cut from it even when
    `data.public` and `data.test` come from their own sources (then it is the
    whole pool), so its manifest always carries `carved_source(..., "private", ...)`.
    """
    return " private (stratified" in source


def refuse_private_split(name: str, data_dir: str | Path, source: str, why: str) -> None:
    """Refuse a folder that `prepare` marked private where only public data may go.

    Args:
        name: the argument that named the folder (e.g. `public_dir`), for the message.
        data_dir: the folder.
        source: its manifest's `source`.
        why: what the public split is used for, e.g. "pre-training is not private".

    Raises:
        InputError: naming the folder and the fix (pass artifacts/prepare/public).
    """
    if is_carved_private(source):
        raise InputError(f"{name}={str(data_dir)!r} is the PRIVATE split (manifest source "
                         f"{source!r}, as `dpsynth prepare` marks it); {why}: pass the "
                         "public split, artifacts/prepare/public")
