"""The one validation helper of the config sections."""

from __future__ import annotations

from typing import Any

from dpsynth.errors import ConfigError


def check(ok: bool, name: str, value: Any, why: str) -> None:
    """Raise `ConfigError("name=value: why")` unless `ok`: errors name the field."""
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")
