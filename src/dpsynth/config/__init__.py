"""Typed, validated configuration.

One frozen dataclass per `params.yaml` section (the modules of this package),
assembled here into `Config`. Values are checked when the
dataclass is built, and errors name the field (`pretrain.steps=0: must be >= 1`).
Config fields are public settings only: nothing derived from private data lives
here (PRIVACY.md rule 6).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from dpsynth.config.data import DataConfig, SourceConfig, SplitRole
from dpsynth.config.evaluation import (AuditConfig, ClassifierAugment, ClassifierConfig,
                                       ClassifyConfig, DomainCnnConfig, FidConfig,
                                       RankConfig, ReportConfig, SampleConfig, SweepConfig)
from dpsynth.config.model import DiffusionConfig, ModelConfig, TimestepConfig
from dpsynth.config.services import StorageConfig, TrackingConfig
from dpsynth.config.training import FinetuneConfig, PretrainConfig, PrivacyConfig
from dpsynth.errors import ConfigError

__all__ = ["AuditConfig", "ClassifierAugment", "ClassifierConfig", "ClassifyConfig", "Config",
           "DataConfig", "DiffusionConfig", "DomainCnnConfig", "FidConfig", "FinetuneConfig",
           "ModelConfig", "PretrainConfig", "PrivacyConfig", "RankConfig", "ReportConfig",
           "SampleConfig", "SourceConfig", "SplitRole", "StorageConfig", "SweepConfig",
           "TimestepConfig", "TrackingConfig", "differences", "from_dict", "load",
           "resolved_yaml", "to_yaml", "yaml_load"]


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole resolved configuration (`params.yaml`)."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        # cross-section check: fine-tuning timesteps live in the diffusion's range
        self.finetune.timesteps.validate("finetune.timesteps", self.diffusion.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def section(self, *names: str) -> dict[str, Any]:
        """The resolved values of some sections, for logging as a stage's params."""
        full = self.to_dict()
        return {name: full[name] for name in names}


# --------------------------------------------------------------------------- loading


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float. PyYAML follows YAML 1.1, where
    a float needs a dot (`1.0e-3`), so `--set pretrain.lr=1e-3` was a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """YAML (safe) with `1e-3` read as a float, as `--set` and config files are read."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _build(cls: Any, raw: Any, where: str) -> Any:
    """Build dataclass/typed value `cls` from YAML data, naming `where` in errors."""
    origin = typing.get_origin(cls)
    args = typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}={raw!r}: must be a mapping")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known keys: "
                              f"{sorted(names)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in raw.items()}
        try:
            return cls(**kwargs)
        except TypeError as err:  # e.g. a missing required field
            raise ConfigError(f"{where or 'config'}: {err}") from None
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], raw, where)
    if origin is Literal:
        # type-strict: `true` or `1.0` must not pass as the choice 1
        if not any(type(raw) is type(a) and raw == a for a in args):
            raise ConfigError(f"{where}={raw!r}: must be one of {list(args)}")
        return raw
    if origin is tuple:
        if not isinstance(raw, Sequence) or isinstance(raw, str):
            raise ConfigError(f"{where}={raw!r}: must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(raw))
        if len(raw) != len(args):
            raise ConfigError(f"{where}={raw!r}: must have {len(args)} items")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}={raw!r}: must be a mapping")
        vt = args[1] if args else Any
        return {str(k): _build(vt, v, f"{where}.{k}") for k, v in raw.items()}
    if cls is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}={raw!r}: must be true or false")
        return raw
    if cls is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}={raw!r}: must be an integer")
        return raw
    if cls is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{where}={raw!r}: must be a number")
        return float(raw)
    if cls is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}={raw!r}: must be a string")
        return raw
    return raw


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. pretrain.steps=100")
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml_load(value)


def from_dict(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """Build a validated `Config` from a mapping plus `--set` style overrides."""
    tree = json.loads(json.dumps(raw or {}))  # deep copy, plain types
    for assignment in overrides:
        _apply_override(tree, assignment)
    return _build(Config, tree, "")


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when `path` is None)."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass --config params.yaml "
                              "or one of configs/*.yaml")
        try:
            raw = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)  # one line, not PyYAML's multi-line text
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = getattr(err, "problem", None) or " ".join(str(err).split())
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {why}; "
                              "fix the file") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return from_dict(raw, overrides)


# --------------------------------------------------------------------------- writing


def differences(cfg: Config, base: Config | None = None) -> dict[str, Any]:
    """What `cfg` sets differently from `base` (default: the defaults, `Config()`),
    as the nested mapping a config file of overrides holds: a section or a
    dataclass field is descended into, any other value (a list, a source, the
    fractions) is given whole.

    >>> differences(from_dict({"pretrain": {"steps": 7}, "seed": 0}))
    {'pretrain': {'steps': 7}}
    """
    def diff(value: Any, default: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            mine, theirs = getattr(value, f.name), getattr(default, f.name)
            if mine == theirs:
                continue
            # a file's partial mapping is completed with the class's defaults, so it
            # can say only what differs where the default is the class's own
            nested = (dataclasses.is_dataclass(mine) and type(mine) is type(theirs)
                      and f.name not in _WHOLE and _is_class_default(theirs))
            out[f.name] = diff(mine, theirs) if nested else _plain(mine)
        return out

    return diff(cfg, base if base is not None else Config())


def _is_class_default(value: Any) -> bool:
    try:
        return type(value)() == value
    except TypeError:  # a field without a default
        return False


# Sources are read whole: a source's fields belong together (a path without its kind
# means nothing), so an override file gives the source entire.
_WHOLE = frozenset({"private", "public", "test"})


def _plain(value: Any) -> Any:
    """YAML-able: dataclasses as mappings, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return json.loads(json.dumps(dataclasses.asdict(value)))
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value))


def resolved_yaml(cfg: Config, header: str = "") -> str:
    """`cfg` with every field explicit, as YAML (`to_yaml`), after `header` (comment
    lines): what `dpsynth config resolve` writes for DVC, which reads params.yaml as
    plain YAML and tracks each stage's sections in it."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + to_yaml(cfg.to_dict())


class _Flow(dict):
    """A mapping written inline (`{a: 1, b: 2}`)."""


class _FlowList(list):
    """A list written inline (`[1, 2]`)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping(
    "tag:yaml.org,2002:map", v.items(), flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))


def to_yaml(tree: Mapping[str, Any]) -> str:
    """A config tree as params.yaml is written: one block per section and field,
    each field's value (a source, a list, a classifier recipe) on its line."""
    def inline(value: Any) -> Any:
        if isinstance(value, Mapping):
            return _Flow({k: inline(v) for k, v in value.items()})
        if isinstance(value, list):
            return _FlowList(inline(v) for v in value)
        return value

    def field_value(value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            return [inline(v) for v in value]  # a grid: one configuration per line
        return inline(value)

    out = {section: ({k: field_value(v) for k, v in body.items()}
                     if isinstance(body, Mapping) else body)
           for section, body in tree.items()}
    return yaml.dump(out, Dumper=_Dumper, sort_keys=False, width=1000)
