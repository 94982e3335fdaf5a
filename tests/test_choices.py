"""One table per list of choices (`dpsynth.choices`): the config accepts exactly its
names, the CLI offers them, and every implementation table is keyed by them."""

from __future__ import annotations

import argparse
import typing

import pytest

from dpsynth import choices, cli
from dpsynth.config import FidConfig, from_dict
from dpsynth.errors import ConfigError

LISTS = [(choices.ACCOUNTANTS, choices.AccountantKind, "finetune.accountant"),
         (choices.SOURCE_KINDS, choices.SourceKind, "data.private.kind"),
         (choices.SAMPLERS, choices.SamplerKind, "sample.sampler"),
         (choices.PER_EXAMPLE, choices.PerExampleKind, "finetune.per_example"),
         (choices.PRECISIONS, choices.PrecisionKind, "pretrain.precision")]


@pytest.mark.parametrize("table, kind, key", LISTS, ids=[k for _, _, k in LISTS])
def test_the_config_accepts_exactly_the_tables_names(table: dict, kind: object,
                                                     key: str) -> None:
    assert typing.get_args(kind) == tuple(table)
    for name in table:
        if key.startswith("data"):  # a source also needs a path, or for printed digits a size
            extra = "size: 100" if name == "printed-digits" else (
                "" if name in choices.EMBEDDED_KINDS else "path: /data/x")
            from_dict({}, [f"data.private={{kind: {name}, {extra}}}"])
        else:
            from_dict({}, [f"{key}={name}"])
    with pytest.raises(ConfigError) as info:
        from_dict({}, [f"{key}=no-such-choice"])
    assert all(repr(name) in str(info.value) or name in str(info.value) for name in table)


def test_the_extractors_table_is_what_fid_accepts() -> None:
    assert typing.get_args(choices.ExtractorKind) == tuple(choices.EXTRACTORS)
    hint = typing.get_type_hints(FidConfig)["extractors"]
    assert typing.get_args(typing.get_args(hint)[0]) == tuple(choices.EXTRACTORS)


def test_each_implementation_table_is_keyed_by_the_names() -> None:
    from dpsynth.data.sources import readers
    from dpsynth.diffusion.samplers import SCHEDULERS
    from dpsynth.privacy.accounting import EPSILON

    assert set(EPSILON) == set(choices.ACCOUNTANTS)
    assert set(SCHEDULERS) == set(choices.SAMPLERS)
    assert set(readers()) == set(choices.SOURCE_KINDS)
    assert set(choices.EMBEDDED_KINDS) <= set(choices.SOURCE_KINDS)


def test_the_cli_offers_the_tables_choices() -> None:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {s: a for a in sub.choices["plan"]._actions for s in a.option_strings}
    assert tuple(flags["--accountant"].choices) == tuple(choices.ACCOUNTANTS)
