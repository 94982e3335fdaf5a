"""Config: defaults, YAML loading, `--set` overrides, and errors that name the field."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dpsynth import config
from dpsynth.config import (Config, DataConfig, DiffusionConfig, ModelConfig, PretrainConfig,
                            SampleConfig, SourceConfig, TimestepConfig)
from dpsynth.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_match_the_documented_embedded_setup() -> None:
    cfg = config.load()
    assert cfg == Config()
    assert cfg.data.private == SourceConfig(kind="digits", path=None)
    assert (cfg.data.image_size, cfg.data.channels) == (8, 1)
    assert cfg.data.public == SourceConfig(kind="printed-digits", size=6000)
    assert dict(cfg.data.fractions) == {"public": 0.0, "private": 0.8, "test": 0.2}
    assert cfg.sample.sampler == "dpmsolver++"
    assert cfg.diffusion.timesteps.kind == "uniform"  # pre-training
    assert cfg.finetune.timesteps.kind == "piecewise"  # the paper's biased sampling


def test_config_error_is_an_input_error() -> None:
    # the CLI maps InputError to exit code 2; ConfigError must be one
    assert issubclass(ConfigError, InputError)
    assert issubclass(ConfigError, ValueError)


def test_yaml_file_loads_nested_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 7,
        "data": {"private": {"kind": "cifar10", "path": "/data/cifar-10-python.tar.gz"},
                 "image_size": 32, "channels": 3},
        "model": {"block_out_channels": [16, 32], "attention_levels": [1],
                  "norm_num_groups": 4},
        "diffusion": {"timesteps": {"kind": "piecewise", "intervals": [[0, 100], [100, 1000]],
                                    "weights": [0.3, 0.7]}},
        "pretrain": {"lr": 1},  # an int where a float is expected is accepted as a float
    }))
    cfg = config.load(path)
    assert cfg.seed == 7
    assert cfg.data.private == SourceConfig(kind="cifar10", path="/data/cifar-10-python.tar.gz")
    assert (cfg.data.image_size, cfg.data.channels) == (32, 3)
    assert cfg.model.block_out_channels == (16, 32)  # lists become tuples
    assert cfg.diffusion.timesteps.intervals == ((0, 100), (100, 1000))
    assert cfg.diffusion.timesteps.weights == (0.3, 0.7)
    assert cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)
    # untouched sections keep their defaults
    assert cfg.sample == SampleConfig()


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path: Path) -> None:
    # PyYAML alone (YAML 1.1) reads `2e-4` as a string
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  lr: 2e-4\nsample:\n  guidance_scale: 3E0\n")
    cfg = config.load(path, overrides=["pretrain.ema_decay=9.99e-1"])
    assert cfg.pretrain.lr == 2e-4
    assert cfg.sample.guidance_scale == 3.0
    assert cfg.pretrain.ema_decay == 0.999
    with pytest.raises(ConfigError, match=r"^pretrain.steps=1000.0: must be an integer"):
        config.from_dict({}, ["pretrain.steps=1e3"])
    assert yaml.safe_load("1e-3") == "1e-3"  # the global SafeLoader is left alone


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert config.load(path) == Config()


def test_set_overrides_nested_values_with_yaml_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  steps: 10\n")
    cfg = config.load(path, overrides=[
        "pretrain.steps=20",                       # overrides the file
        "pretrain.lr=1e-3",                        # YAML float
        "tracking.enabled=false",                  # YAML bool
        "model.block_out_channels=[16, 32]",       # YAML list -> tuple
        "model.attention_levels=[1]",
        "data.public.kind=npz",                    # creates a section that was null
        "data.public.path=s3://bucket/x=1.npz",    # '=' in the value is kept
        "diffusion.timesteps={kind: piecewise, intervals: [[0, 10]], weights: [1]}",
    ])
    assert cfg.pretrain.steps == 20
    assert cfg.pretrain.lr == pytest.approx(1e-3)
    assert cfg.tracking.enabled is False
    assert cfg.model.block_out_channels == (16, 32)
    assert cfg.data.public == SourceConfig(kind="npz", path="s3://bucket/x=1.npz")
    assert cfg.diffusion.timesteps == TimestepConfig(kind="piecewise", intervals=((0, 10),),
                                                     weights=(1.0,))


def test_later_override_wins() -> None:
    cfg = config.from_dict({}, ["seed=1", "seed=2"])
    assert cfg.seed == 2


def test_from_dict_does_not_mutate_its_input() -> None:
    raw = {"pretrain": {"steps": 5}}
    config.from_dict(raw, ["pretrain.steps=6", "sample.eta=0.5"])
    assert raw == {"pretrain": {"steps": 5}}


@pytest.mark.parametrize("assignment, match", [
    ("pretrain.steps", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("seed.x=3", "'seed' is not a section"),
])
def test_malformed_override_names_it(assignment: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        config.from_dict({"seed": 1}, [assignment])
    assert assignment in str(info.value)


def test_override_into_an_unset_scalar_is_a_type_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^seed=\{'x': 3\}: must be an integer"):
        config.from_dict({}, ["seed.x=3"])


@pytest.mark.parametrize("raw, where, bad, known", [
    ({"pretrian": {}}, "", "pretrian", "pretrain"),
    ({"pretrain": {"stepz": 3}}, "pretrain", "stepz", "steps"),
    ({"diffusion": {"timesteps": {"knd": "uniform"}}}, "diffusion.timesteps", "knd", "kind"),
    ({"data": {"private": {"paht": "x"}}}, "data.private", "paht", "path"),
])
def test_unknown_key_is_named_and_known_keys_listed(raw: dict, where: str, bad: str,
                                                    known: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw)
    msg = str(info.value)
    assert msg.startswith(f"{where}:" if where else "config:")  # top level: "config"
    assert f"unknown key(s) ['{bad}']" in msg
    assert "known keys" in msg and f"'{known}'" in msg


def test_unknown_key_via_set_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epsilonn'\]"):
        config.from_dict({}, ["sample.epsilonn=3"])


# (override, the field the message must start with)
INVALID = [
    ("seed=1.5", "seed=1.5: must be an integer"),
    ("seed=true", "seed=True: must be an integer"),
    ("pretrain.steps=0", "pretrain.steps=0"),
    ("pretrain.batch_size=-1", "pretrain.batch_size=-1"),
    ("pretrain.checkpoint_every=0", "pretrain.checkpoint_every=0"),
    ("pretrain.log_every=0", "pretrain.log_every=0"),
    ("pretrain.lr=0", "pretrain.lr=0.0"),
    ("pretrain.lr=abc", "pretrain.lr='abc': must be a number"),
    ("pretrain.warmup_steps=-1", "pretrain.warmup_steps=-1"),
    ("pretrain.ema_decay=1", "pretrain.ema_decay=1.0"),
    ("pretrain.steps=ten", "pretrain.steps='ten': must be an integer"),
    ("data.image_size=3", "data.image_size=3"),
    ("data.image_size=1024", "data.image_size=1024"),
    ("data.channels=2", "data.channels=2: must be one of [1, 3]"),
    ("data.channels=true", "data.channels=True: must be one of [1, 3]"),
    ("data.channels=1.0", "data.channels=1.0: must be one of [1, 3]"),
    ("data.shard_size=0", "data.shard_size=0"),
    ("data.fractions={public: 0.5, private: 0.5, test: 0.5}", "data.fractions="),
    ("data.fractions={public: 0.5, private: 0.5}", "data.fractions="),
    ("data.fractions={public: -0.5, private: 1.0, test: 0.5}", "data.fractions="),
    ("data.private.kind=cifar10", "data.private.path=None"),
    ("data.private.kind=mnist", "data.private.kind='mnist': must be one of"),
    ("data.test={kind: imagefolder}", "data.test.path=None"),
    ("data.private.hospitals=[0, 1]", "data.private.hospitals=(0, 1)"),
    ("data.private=3", "data.private=3: must be a mapping"),
    ("model.block_out_channels=[12, 16]", "model.block_out_channels=(12, 16)"),
    ("model.block_out_channels=[]", "model.block_out_channels=()"),
    ("model.block_out_channels=16", "model.block_out_channels=16: must be a list"),
    ("model.norm_num_groups=0", "model.norm_num_groups=0"),  # was a ZeroDivisionError
    ("model.block_out_channels=[0, 16]", "model.block_out_channels=(0, 16)"),
    ("model.layers_per_block=0", "model.layers_per_block=0"),
    ("model.attention_levels=[3]", "model.attention_levels=(3,)"),
    ("model.dropout=1", "model.dropout=1.0"),
    ("diffusion.num_train_timesteps=1", "diffusion.num_train_timesteps=1"),
    ("diffusion.beta_schedule=cosine", "diffusion.beta_schedule='cosine'"),
    ("diffusion.prediction_type=x0", "diffusion.prediction_type='x0'"),
    ("diffusion.label_dropout=1", "diffusion.label_dropout=1.0"),
    ("diffusion.timesteps.kind=biased", "diffusion.timesteps.kind='biased'"),
    ("diffusion.timesteps={kind: piecewise, intervals: [[0, 10], [10, 20]], weights: [1]}",
     "diffusion.timesteps.intervals="),
    ("diffusion.timesteps={kind: piecewise}", "diffusion.timesteps.intervals=()"),
    ("diffusion.timesteps={kind: piecewise, intervals: [[10, 10]], weights: [1]}",
     "diffusion.timesteps.intervals="),
    ("diffusion.timesteps={kind: piecewise, intervals: [[-1, 10]], weights: [1]}",
     "diffusion.timesteps.intervals="),
    ("diffusion.timesteps={kind: piecewise, intervals: [[0, 1001]], weights: [1]}",
     "diffusion.timesteps.intervals="),
    ("diffusion.timesteps={kind: piecewise, intervals: [[0, 10, 20]], weights: [1]}",
     "diffusion.timesteps.intervals[0]="),
    ("diffusion.timesteps={kind: piecewise, intervals: [[0, 10]], weights: [0]}",
     "diffusion.timesteps.weights=(0.0,)"),
    ("diffusion.timesteps={kind: piecewise, intervals: [[0, 5], [5, 9]], weights: [2, -1]}",
     "diffusion.timesteps.weights=(2.0, -1.0)"),
    ("sample.sampler=x", "sample.sampler='x': must be one of"),
    ("sample.num_samples=0", "sample.num_samples=0"),
    ("sample.num_shards=3000", "sample.num_shards=3000: must be <= sample.num_samples=2000"),
    ("sample.batch_size=0", "sample.batch_size=0"),
    ("sample.num_inference_steps=0", "sample.num_inference_steps=0"),
    ("sample.eta=1.5", "sample.eta=1.5"),
    ("sample.guidance_scale=-1", "sample.guidance_scale=-1.0"),
    ("tracking.enabled=3", "tracking.enabled=3: must be true or false"),
    ("tracking.enabled=yes please", "tracking.enabled='yes please': must be true or false"),
    ("tracking.experiment=5", "tracking.experiment=5: must be a string"),
    ("fid.extractors=[]", "fid.extractors=()"),
    ("fid.extractors=[domain-cnn, domain-cnn]", "fid.extractors=("),
    ("fid.extractors=[inception]", "fid.extractors[0]='inception': must be one of"),
    ("fid.extractors=[inception-v3-compat]", "fid.inception_weights=None: the inception-v3"),
    ("fid.max_features=0", "fid.max_features=0"),
    ("fid.domain_cnn.steps=0", "fid.domain_cnn.steps=0"),
    ("classify.classifier.depth=12", "classify.classifier.depth=12: WRN depth must be 6n+4"),
    ("classify.classifier.augment=rotate", "classify.classifier.augment='rotate'"),
    ("classify.classifier.lr=0", "classify.classifier.lr=0.0"),
    ("classify.sizes=[500, 250]", "classify.sizes=(500, 250): needs increasing"),
    ("classify.sizes=[]", "classify.sizes=()"),
    ("rank.grid=[{depth: 10}]", "rank.grid=1: a ranking needs at least 2"),
    ("rank.grid=[{depth: 10}, {depth: 11}]", "rank.grid[1].depth=11"),
    ("rank.val_fraction=1", "rank.val_fraction=1.0"),
    ("rank.confidence=0", "rank.confidence=0.0: must be in (0, 1)"),
    ("rank.confidence=1", "rank.confidence=1.0: must be in (0, 1)"),
    ("rank.bootstrap=0", "rank.bootstrap=0: too few resamples for a 0.95 interval: need >= 40"),
    ("rank.bootstrap=39", "rank.bootstrap=39: too few resamples for a 0.95 interval: need >= 40"),
    ("rank.bootstrap=true", "rank.bootstrap=True: must be an integer"),
    # the default 1000 resamples cannot bound the tails of a 99.9% interval
    ("rank.confidence=0.999", "rank.bootstrap=1000: too few resamples for a 0.999 interval: "
     "need >= 2000"),
    ("audit.check_epsilon=0", "audit.check_epsilon=0.0: must be > 0"),
    # the printed-digits source and the fine-tuning levers
    ("data.public={kind: printed-digits}", "data.public.size=None: printed-digits needs a size"),
    ("data.public={kind: printed-digits, size: 5}", "data.public.size=5: printed-digits needs"),
    ("data.public={kind: printed-digits, size: 100, path: /x}",
     "data.public.path='/x': printed-digits is rendered, not read; remove the path"),
    ("data.public={kind: npz, path: /x.npz, size: 100}",
     "data.public.size=100: only printed-digits sources have a size"),
    ("finetune.trainable=[]", "finetune.trainable=(): needs at least one glob pattern"),
    ("finetune.lora_rank=-1", "finetune.lora_rank=-1: must be >= 0"),
    ("sweep.epsilons=[0, 1]", "sweep.epsilons=[0.0, 1.0]: every target epsilon must be > 0"),
    ("sweep.epsilons=[2, 1]", "sweep.epsilons=[2.0, 1.0]: must be strictly increasing"),
    ("finetune.lora_alpha=0", "finetune.lora_alpha=0.0: must be > 0"),
    ("audit.check_epsilon=-1", "audit.check_epsilon=-1.0: must be > 0"),
]


@pytest.mark.parametrize("assignment, prefix", INVALID, ids=[a for a, _ in INVALID])
def test_invalid_value_error_names_the_field(assignment: str, prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({}, [assignment])
    assert str(info.value).startswith(prefix), str(info.value)


def test_piecewise_mismatch_reports_weight_count() -> None:
    with pytest.raises(ConfigError, match=r"got 1 weights"):
        DiffusionConfig(timesteps=TimestepConfig(
            kind="piecewise", intervals=((0, 10), (10, 20)), weights=(1.0,)))


def test_interval_bound_uses_num_train_timesteps() -> None:
    ok = TimestepConfig(kind="piecewise", intervals=((0, 50),), weights=(1.0,))
    DiffusionConfig(num_train_timesteps=50, timesteps=ok)
    with pytest.raises(ConfigError, match=r"hi <= 40"):
        DiffusionConfig(num_train_timesteps=40, timesteps=ok)


def test_direct_construction_validates_too() -> None:
    # validation lives in the dataclasses, not only in the loader
    with pytest.raises(ConfigError, match=r"^pretrain.steps=0"):
        PretrainConfig(steps=0)
    with pytest.raises(ConfigError, match=r"^model.block_out_channels=\(8, 12\)"):
        ModelConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match=r"^data.private.path"):
        DataConfig(private=SourceConfig(kind="camelyon17"))
    with pytest.raises(ConfigError, match=r"^sample.num_shards=5"):
        SampleConfig(num_samples=4, num_shards=5)


def test_configs_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pretrain.steps = 3  # type: ignore[misc]


NON_DEFAULT = [
    "seed=3",
    "data.private={kind: camelyon17, path: /x, hospitals: [0, 3]}",
    "data.public={kind: imagenet32, path: s3://b/imagenet32}",
    "data.fractions={public: 0.1, private: 0.8, test: 0.1}",
    "model.block_out_channels=[16, 32]",
    "model.attention_levels=[]",
    "model.norm_num_groups=4",
    "diffusion.prediction_type=v_prediction",
    "diffusion.timesteps={kind: piecewise, intervals: [[0, 200], [200, 1000]], "
    "weights: [0.25, 0.75]}",
    "sample.sampler=ddim",
    "sample.eta=0.5",
    "tracking.enabled=false",
]


def test_to_dict_round_trips_to_an_equal_config() -> None:
    for cfg in (Config(), config.from_dict({}, NON_DEFAULT)):
        plain = cfg.to_dict()
        assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain YAML/JSON types only
        assert config.from_dict(plain) == cfg


def test_round_trip_through_a_yaml_file(tmp_path: Path) -> None:
    cfg = config.from_dict({}, NON_DEFAULT)
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert config.load(path) == cfg


def test_section_returns_only_the_named_sections() -> None:
    cfg = config.from_dict({}, ["pretrain.steps=9"])
    got = cfg.section("seed", "pretrain")
    assert set(got) == {"seed", "pretrain"}
    assert got["pretrain"]["steps"] == 9


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml") as info:
        config.load(missing)
    assert "not found" in str(info.value)


def test_invalid_yaml_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*not valid YAML"):
        config.load(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(path)


REPO_CONFIGS = sorted([*REPO.glob("params.yaml"), *REPO.glob("configs/*.yaml")])


def test_the_repo_ships_the_default_and_smoke_configs() -> None:
    assert {p.relative_to(REPO).as_posix() for p in REPO_CONFIGS} >= {
        "params.yaml", "configs/smoke.yaml"}


@pytest.mark.parametrize("path", REPO_CONFIGS,
                         ids=[str(p.relative_to(REPO)) for p in REPO_CONFIGS])
def test_repo_configs_load(path: Path) -> None:
    cfg = config.load(path)
    assert isinstance(cfg, Config)
    assert config.from_dict(cfg.to_dict()) == cfg


def test_storage_section_takes_no_credentials() -> None:
    cfg = config.from_dict({"storage": {"endpoint_url": "http://minio:9000",
                                        "retry_mode": "adaptive", "max_attempts": 8}})
    assert (cfg.storage.endpoint_url, cfg.storage.retry_mode) == ("http://minio:9000", "adaptive")
    assert not [f.name for f in dataclasses.fields(cfg.storage)
                if any(w in f.name for w in ("key", "secret", "password", "token"))]
    with pytest.raises(ConfigError, match="storage.endpoint_url: holds user:password@") as info:
        config.from_dict({}, ["storage.endpoint_url=http://AKIAX:s3cr3tvalue@minio:9000"])
    assert "s3cr3tvalue" not in str(info.value)  # the error does not echo it
    for bad, why in (("storage.retry_mode=legacy", "must be one of"),
                     ("storage.multipart_chunksize_mb=1", "S3's minimum part size"),
                     ("storage.endpoint_url=minio:9000", r"must be an http\(s\)://host")):
        with pytest.raises(ConfigError, match=why):
            config.from_dict({}, [bad])


@pytest.mark.parametrize("path", REPO_CONFIGS,
                         ids=[str(p.relative_to(REPO)) for p in REPO_CONFIGS])
def test_repo_configs_check_twin_is_at_an_epsilon_their_audit_can_refute(path: Path) -> None:
    """The check twin is there because the claim is beyond what a one-run audit can
    certify; at or above the best case (an exact half of the canaries included, a
    perfect attack) it would be inconclusive too."""
    from dpsynth.audit.one_run import max_certifiable_epsilon

    cfg = config.load(path)
    ac, m = cfg.audit, cfg.audit.num_canaries
    best = max_certifiable_epsilon(np.arange(m) < m // 2, guess_fractions=ac.guess_fractions,
                                   delta=cfg.finetune.delta, confidence=ac.confidence)
    assert ac.check_epsilon < best


# --------------------------------------------------------------------------- one set of defaults

OVERRIDE_FILES = sorted(REPO.glob("configs/*.yaml"))


def test_params_yaml_restates_the_code_defaults_field_for_field() -> None:
    """One set of defaults: params.yaml (what DVC tracks, with the comments) is the
    code's defaults written out, every section and every field of each (storage
    aside: a deployment's setting, not an experiment's)."""
    raw = config.yaml_load((REPO / "params.yaml").read_text())
    assert config.from_dict(raw) == Config()
    sections = typing.get_type_hints(Config)
    missing = [name for name in sections if name not in raw]
    missing += [f"{name}.{f.name}" for name, cls in sections.items()
                if dataclasses.is_dataclass(cls) and name in raw
                for f in dataclasses.fields(cls) if f.name not in raw[name]]
    assert missing == ["storage"]


def _key_tree(tree: Any, default: Any) -> Any:
    """The keys a config file states: it descends into a section, and into a setting
    whose default is its class's own (a classifier recipe); anything else (a source,
    a list, the piecewise timesteps of fine-tuning) is one value."""
    if not isinstance(tree, dict):
        return None
    return {k: _key_tree(v, getattr(default, k)) if _descends(k, getattr(default, k))
            else None for k, v in tree.items()}


def _descends(name: str, default: Any) -> bool:
    return (dataclasses.is_dataclass(default) and name not in ("private", "public", "test")
            and type(default)() == default)


@pytest.mark.parametrize("path", OVERRIDE_FILES, ids=[p.name for p in OVERRIDE_FILES])
def test_config_files_hold_only_what_differs_from_the_defaults(path: Path) -> None:
    """configs/*.yaml are overrides, not copies: every key a file states differs from
    its default (a copied default would drift from the code's), and reading the file
    back from its differences gives the same config."""
    cfg = config.load(path)
    diff = config.differences(cfg)
    assert config.from_dict(diff) == cfg
    stated = _key_tree(config.yaml_load(path.read_text()), Config())
    assert stated == _key_tree(diff, Config()), (
        f"{path.name} restates defaults; `dpsynth config diff {path.name}` prints its overrides")


def test_differences_round_trip_nested_settings() -> None:
    """A nested setting whose default is not its class's (fine-tuning's piecewise
    timesteps, the printed-digits public source) is written whole, so that reading
    it back does not fill the rest from the class."""
    for overrides in (["finetune.timesteps.weights=[1, 1, 1]"],
                      ["finetune.timesteps={kind: uniform}"],
                      ["data.public={kind: printed-digits, size: 100}"], ["data.public=null"],
                      ["classify.classifier.widen=4", "rank.grid=[{lr: 0.1}, {lr: 0.2}]"]):
        cfg = config.from_dict({}, overrides)
        assert config.from_dict(config.differences(cfg)) == cfg, overrides
    assert config.differences(Config()) == {}


def test_config_resolve_writes_every_field_and_diff_only_the_overrides(tmp_path: Path) -> None:
    from dpsynth.cli import main

    smoke = REPO / "configs" / "smoke.yaml"
    out = tmp_path / "params.yaml"
    assert main(["config", "resolve", str(smoke), "--set", "pretrain.steps=7", "-o",
                 str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Resolved from ")
    raw = yaml.safe_load(text)  # plain YAML, as DVC reads it
    assert set(raw) == {f.name for f in dataclasses.fields(Config)}
    assert config.from_dict(raw) == config.load(smoke, ["pretrain.steps=7"])
    assert raw["pretrain"]["steps"] == 7 and "ledger_dir" in raw["privacy"]

    diff = tmp_path / "diff.yaml"
    assert main(["config", "diff", str(out), "-o", str(diff)]) == 0
    assert config.load(diff) == config.load(out)
    assert "ledger_dir" not in diff.read_text()  # a default: not restated

    before = text
    assert main(["config", "resolve", str(smoke), "--set", "pretrain.steps=0", "-o",
                 str(out)]) == 2  # invalid: nothing written
    assert out.read_text() == before
