"""The CLI parses, builds the config and calls stages; errors map to exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dpsynth import cli
from dpsynth.io.shards import read_dataset
from dpsynth.stages import registry


def _commands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # the subparsers
    return sorted(action.choices)


def test_the_command_list_is_complete() -> None:
    assert {"prepare", "pretrain", "finetune", "sample", "fid", "classify", "rank", "audit",
            "submit", "mlflow-server", "summary"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_subcommand_help_says_what_it_does_with_an_example(
        command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]  # after the usage line(s)
    assert len(description.split()) >= 6, f"{command}: no description"
    assert "example:" in out and f"dpsynth {command}" in out.split("example:")[1]
    # and the one-line summary in `dpsynth --help` (a stage's is its registry row's)
    assert (cli.SHORT.get(command) or command in registry.STAGES and registry.stage(command).short
            or command == "summary")


def test_top_level_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert set(_commands()) <= listed
    assert "exit codes: 0 ok, 2 usage or bad input" in out and "1 failure" in out


def test_unknown_config_key_exits_2_naming_the_key(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["prepare", "--set", "data.imagesize=16", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "data: unknown key(s) ['imagesize']" in err and "image_size" in err
    assert not (tmp_path / "o").exists()


def test_bad_override_syntax_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["prepare", "--set", "seed", "--out", str(tmp_path / "o")]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["prepare", "--config", str(tmp_path / "nope.yaml"), "--out",
                     str(tmp_path / "o")])
    assert code == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_prepare_runs_through_cli_with_tracking_off(tmp_path: Path) -> None:
    out = tmp_path / "prep"
    code = cli.main(["prepare", "-q", "--set", "tracking.enabled=false", "--out", str(out)])
    assert code == 0
    images, labels, manifest = read_dataset(out / "public")
    assert manifest.shape == (8, 8, 1) and len(images) == len(labels) > 0
    assert json.loads((out / "params.json").read_text())["data"]["image_size"] == 8


def test_sample_without_model_is_a_usage_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["sample", "--set", "tracking.enabled=false", "--out", str(tmp_path / "s")])
    assert code == 2
    assert "--model is required" in capsys.readouterr().err


def test_summary_lists_stages_and_mlflow_command(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.json").write_text(json.dumps({"final_loss": 0.123456}))
    assert cli.main(["summary", "--artifacts", str(tmp_path), "--seconds", "42"]) == 0
    out = capsys.readouterr().out
    assert "finished in 42 s" in out
    assert "final_loss=0.1235" in out
    assert "prepare   not run" in out
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in out


def test_folder_arguments_keep_s3_uris_intact() -> None:
    args = cli.build_parser().parse_args(
        ["finetune", "--model", "s3://bkt/run/pretrain", "--private", "data/private",
         "--public", "s3://bkt/run/prepare/public", "--out", "s3://bkt/run/finetune"])
    # a Path would have turned s3://bkt into s3:/bkt
    assert (args.model, args.public, args.out) == (
        "s3://bkt/run/pretrain", "s3://bkt/run/prepare/public", "s3://bkt/run/finetune")
    assert args.private == Path("data/private")


def test_a_stage_with_an_unreachable_bucket_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, s3) -> None:
    code = cli.main(["pretrain", "--set", "tracking.enabled=false", "--public",
                     "s3://no-such-bucket-dpsynth/prepare/public", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "s3://no-such-bucket-dpsynth/prepare/public" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rank_prints_the_correlations_with_their_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from dpsynth.stages import rank

    result = rank.RankResult(out_dir=tmp_path / "rank", synthetic_val_accuracy=(0.5, 0.9),
                             real_test_accuracy=(0.6, 0.95), spearman_rho=0.9, kendall_tau=0.8,
                             spearman_rho_ci=(0.6123, 1.0), kendall_tau_ci=(-0.25, 0.9),
                             chosen_config=1, regret=0.0, classifier_version=None,
                             generator_version=None)
    monkeypatch.setattr(rank, "run", lambda cfg, **kw: result)
    code = cli.main(["rank", "--set", "tracking.enabled=false", "--set", "rank.confidence=0.9",
                     "--synthetic", str(tmp_path), "--test", str(tmp_path),
                     "--dp-model", str(tmp_path), "--out", str(tmp_path / "rank")])
    assert code == 0
    out = capsys.readouterr().out
    assert ("rank: Spearman rho 0.900 (90% CI [0.612, 1.000]), Kendall tau 0.800 "
            "(90% CI [-0.250, 0.900]), regret 0.000; champion = config 1") in out


@pytest.mark.parametrize("command, old, name", [
    ("fid", "--reference", "test"), ("rank", "--generator", "dp_model"),
    ("audit", "--generator", "dp_model"), ("audit", "--heldout", "test")])
def test_older_input_flags_still_work(command: str, old: str, name: str,
                                      capsys: pytest.CaptureFixture) -> None:
    # one vocabulary (`--test`, `--dp-model`), with the flags of earlier releases kept
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {s: a.dest for a in sub.choices[command]._actions for s in a.option_strings}
    assert flags[old] == flags["--" + name.replace("_", "-")] == name
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert old not in capsys.readouterr().out.split("usage:")[1].split("\n\n")[0]  # not shown
