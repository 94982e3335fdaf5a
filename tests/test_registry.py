"""The stage registry is the one declaration of the stages: `dvc.yaml`, the CLI and
the Kubeflow components are checked against it here (and in tests/cluster), so
none of them can drift from it: the stage set, each stage's inputs, its params
and its code dependencies (every module the stage imports)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from dpsynth import cli
from dpsynth.stages import registry
from dpsynth.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _argv(stage: str) -> dict[str, str]:
    """`dvc.yaml`'s command of `stage` as {flag: value}."""
    words = shlex.split(DVC[stage]["cmd"])
    assert words[:2] == ["dpsynth", stage]
    return {words[i]: words[i + 1] for i in range(2, len(words) - 1, 2)}


def test_dvc_has_one_stage_per_registry_row() -> None:
    assert list(DVC) == list(STAGES)  # and in the same order


@pytest.mark.parametrize("name", [n for n in STAGES if n != "report"])
def test_dvc_command_passes_each_registered_input_from_its_place(name: str) -> None:
    row = STAGES[name]
    argv = _argv(name)
    assert argv == {"--config": "params.yaml",
                    **{i.flag: i.path for i in row.inputs}, "--out": row.out}
    artifact_deps = {d for d in DVC[name]["deps"] if d.startswith("artifacts/")}
    assert artifact_deps == {i.path for i in row.inputs}
    assert DVC[name]["outs"][0] in (row.out, {row.out: {"push": False}}) or name == "prepare"


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_params_are_the_stages_config_sections(name: str) -> None:
    params = {p.split(".")[0] for p in DVC[name]["params"]}
    assert params == set(STAGES[name].sections)


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_deps_cover_every_module_the_stage_imports(name: str) -> None:
    """Editing any module a stage runs (its loss, its checkpoints) re-runs it."""
    deps = [Path(d) for d in DVC[name]["deps"] if d.startswith("src/")]
    missing = sorted(str(f) for f in STAGES[name].code()
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {name} does not depend on {missing}"


def test_the_finetune_stage_depends_on_the_loss_and_the_checkpoints() -> None:
    # the drift this registry check exists for: both were missing from dvc.yaml
    code = {str(p) for p in STAGES["finetune"].code()}
    assert {"src/dpsynth/diffusion/loss.py", "src/dpsynth/training/checkpoint.py"} <= code


def test_the_closure_follows_imports_inside_functions_and_relative_ones(tmp_path: Path,
                                                                       monkeypatch) -> None:
    pkg = tmp_path / "dpsynth"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("def f():\n    from dpsynth.sub import a\n")
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom .c import thing\n")
    (pkg / "sub" / "b.py").write_text("import os\n")
    (pkg / "sub" / "c.py").write_text("thing = 1\n")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(registry, "SRC", tmp_path)
    assert sorted(registry.module_closure("dpsynth.top")) == [
        "dpsynth", "dpsynth.sub", "dpsynth.sub.a", "dpsynth.sub.b", "dpsynth.sub.c",
        "dpsynth.top"]


@pytest.mark.parametrize("name", [n for n in STAGES if n != "report"])
def test_each_stage_command_takes_its_registered_inputs(name: str) -> None:
    parser = cli.build_parser()
    row = STAGES[name]
    argv = [name, "--out", "o", *[a for i in row.inputs for a in (i.flag, i.path)]]
    args = parser.parse_args(argv)
    for i in row.inputs:
        assert str(getattr(args, i.name)) == i.path, i.flag


def test_every_run_keyword_of_a_registered_input_exists() -> None:
    import inspect

    for row in STAGES.values():
        params = inspect.signature(row.load().run).parameters
        for i in row.inputs:
            assert i.kwarg in params, (row.name, i.kwarg)
            # an optional input may be None; a required one may not
            takes_none = "None" in str(params[i.kwarg].annotation)
            assert takes_none == (not i.required), (row.name, i.kwarg)


STAGE_MODULES = {f"dpsynth.stages.{row.module}" for row in STAGES.values()}


@pytest.mark.parametrize("name", list(STAGES))
def test_no_stage_imports_another(name: str) -> None:
    """A stage runs another only through the registry, where `uses` declares it;
    stage code shared by two stages lives in a neutral module, not in either."""
    closure = set(registry.module_closure(f"dpsynth.stages.{STAGES[name].module}"))
    assert closure & STAGE_MODULES == {f"dpsynth.stages.{STAGES[name].module}"}


def _stages_called(path: Path) -> set[str]:
    """Names passed as literals to `stage("...")` / `registry.stage("...")` in `path`."""
    import ast

    calls = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "stage"):
            calls.add(node.args[0].value)
    return calls


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_a_stage_runs_is_declared_in_uses(name: str) -> None:
    # what `code()` (and so dvc.yaml's deps) count as the stage's code
    row = STAGES[name]
    called = set().union(*(_stages_called(p) for p in
                           registry.module_closure(f"dpsynth.stages.{row.module}").values()))
    assert called <= set(row.uses), f"{name} runs {sorted(called - set(row.uses))} undeclared"
    assert set(row.uses) <= set(STAGES)


def test_a_stage_that_uses_others_depends_on_their_code() -> None:
    baseline, sweep = STAGES["baseline"].code(), STAGES["sweep"].code()
    assert STAGES["fid"].code() | STAGES["sample"].code() | STAGES["classify"].code() <= baseline
    assert STAGES["finetune"].code() <= sweep
