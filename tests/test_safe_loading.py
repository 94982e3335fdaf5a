"""Safe loading, checked on the source itself (PRIVACY.md / DESIGN.md "Models"):
every `torch.load` passes `weights_only=True`, every `np.load` passes
`allow_pickle=False`, YAML is read with a safe loader, and the only unpickler is
the CIFAR-10 reader's restricted one. Behaviour (a malicious pickle refused with
no side effect) is tested by tests/test_bad_input.py, tests/data/test_cifar10.py
and tests/eval/test_features.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("src", "components", "pipelines", "benchmarks")
                 for p in (REPO / d).rglob("*.py"))
# the one sanctioned unpickler: allows numpy array globals only (data/cifar10.py)
PICKLE_ALLOWED = {REPO / "src" / "dpsynth" / "data" / "cifar10.py"}


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted name, call) of every call in `path`, e.g. ("torch.load", node)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                found.append((".".join([f.id, *reversed(parts)]), node))
    return found


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(REPO)}:{call.lineno}"


def test_sources_were_found() -> None:
    assert len(SOURCES) > 50 and any(p.name == "features.py" for p in SOURCES)


def test_torch_load_always_has_weights_only_true() -> None:
    bad = [_where(p, c) for p in SOURCES for name, c in _calls(p)
           if name.endswith("torch.load") and _keyword(c, "weights_only") is not True]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_np_load_never_allows_pickle() -> None:
    bad = [_where(p, c) for p in SOURCES for name, c in _calls(p)
           if name in ("np.load", "numpy.load") and _keyword(c, "allow_pickle") is not False]
    assert not bad, f"np.load without allow_pickle=False: {bad}"


def test_no_unpickling_outside_the_restricted_reader() -> None:
    bad = [_where(p, c) for p in SOURCES if p not in PICKLE_ALLOWED
           for name, c in _calls(p)
           if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load",
                       "joblib.load", "cloudpickle.load", "torch.jit.load")]
    assert not bad, f"unpickling: {bad}"
    uses = [n for n, _ in _calls(next(iter(PICKLE_ALLOWED)))]
    assert "pickle.load" not in uses and "pickle.loads" not in uses  # subclass only


def test_yaml_is_read_safely() -> None:
    bad = []
    for p in SOURCES:
        for name, c in _calls(p):
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                loader = _keyword(c, "Loader")
                safe = isinstance(loader, ast.Name) and loader.id in ("_YamlLoader",
                                                                       "SafeLoader")
                if not safe:
                    bad.append(_where(p, c))
    assert not bad, f"unsafe YAML loading: {bad}"


@pytest.mark.parametrize("snippet, rule", [
    ("torch.load(f)", test_torch_load_always_has_weights_only_true),
    ("torch.load(f, weights_only=False)", test_torch_load_always_has_weights_only_true),
    ("np.load(f)", test_np_load_never_allows_pickle),
    ("pickle.loads(b)", test_no_unpickling_outside_the_restricted_reader),
    ("yaml.load(t, Loader=yaml.Loader)", test_yaml_is_read_safely),
])
def test_each_rule_catches_a_planted_violation(snippet: str, rule,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    planted = REPO / "src" / "dpsynth" / "_planted_violation.py"
    monkeypatch.setattr(f"{__name__}.SOURCES", [*SOURCES, planted])
    original = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:  # the planted file exists only here
        return f"{snippet}\n" if self == planted else original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(AssertionError):
        rule()
