"""The stage registry: one row per stage of the pipeline, read by every driver.

A row names the stage, the module whose ``run`` does its work, the inputs
``run`` takes (each with its CLI flag, its ``run`` keyword and where `dvc repro`
puts it), its output folder, its config sections (the module's ``SECTIONS``),
whether it needs a GPU and whether it reads the private split. The CLI builds
each stage command's arguments from its row; tests check `dvc.yaml` and the
Kubeflow pipeline against the rows (the stage set, each stage's inputs, params
and code dependencies: every module the stage imports), so a stage is declared
here once and the drivers cannot drift from it.

The inputs' names: ``public``, ``private`` and ``test`` are the splits of
`prepare`, ``model`` a model folder (the pre-trained one but for `sample`),
``dp_model`` the DP model of `finetune`, ``synthetic`` the samples of `sample`,
and a stage's name its published output. (`fid`'s ``reference``, `rank`'s and
`audit`'s ``generator`` and `audit`'s ``heldout`` are the older names of
``test`` and ``dp_model``.)
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

ARTIFACTS = "artifacts"
SRC = Path(__file__).resolve().parents[2]  # the folder that holds the dpsynth package


@dataclass(frozen=True, kw_only=True)
class Input:
    """One input folder of a stage's ``run``.

    Attributes:
        name: the vocabulary name (``test``, ``dp_model``...); the CLI flag is
            ``--<name>`` with ``-`` for ``_``.
        kwarg: ``run``'s keyword for it (``test_dir``...).
        path: where `dvc repro` puts it, under ``artifacts/``.
        help: the CLI help text.
        required: whether ``run`` needs it (else it may be left out).
        aliases: older CLI flags that still work (``--reference``...).
    """

    name: str
    kwarg: str
    path: str
    help: str
    required: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: what it runs, reads and writes.

    Attributes:
        name: the stage (CLI command, `dvc.yaml` stage, output folder name).
        module: the module under `dpsynth.stages` whose ``run`` does the work (and
            whose ``summary(result, cfg)`` is the CLI's one line about it).
        short: its line in `dpsynth --help`.
        description: its `dpsynth <stage> --help` text.
        inputs: the input folders ``run`` takes, in CLI order.
        gpu: whether it computes on a GPU when there is one (the Kubeflow task
            requests one).
        reads_private: whether it may read the private split.
        examples: more example commands for its --help, after the `dvc repro` one.
        produces: what its output folder holds, in a few words (`make run`'s summary).
        uses: the stages it runs as parts of itself, through this registry (never by
            importing them): their code is its code (`code`).
        resumable: whether it keeps resumable state (checkpoints, finished shards)
            in its work folder: its ``run`` takes ``sync_work``, which the driver
            sets to the upload of a mirrored ``s3://`` work folder.
    """

    name: str
    module: str
    short: str
    description: str
    inputs: tuple[Input, ...] = ()
    gpu: bool = False
    reads_private: bool = False
    examples: tuple[str, ...] = ()
    produces: str = ""
    uses: tuple[str, ...] = ()
    resumable: bool = False

    @property
    def example(self) -> str:
        """The command `dvc repro` runs (inputs from their places), then `examples`."""
        args = " ".join(f"{i.flag} {i.path}" for i in self.inputs)
        return "\n  ".join([f"dpsynth {self.name} --config params.yaml "
                             + (f"{args} " if args else "") + f"--out {self.out}",
                             *self.examples])

    @property
    def out(self) -> str:
        """Its output folder under `dvc repro`'s layout."""
        return f"{ARTIFACTS}/{self.name}"

    def load(self) -> ModuleType:
        return importlib.import_module(f"dpsynth.stages.{self.module}")

    def run(self, cfg: Any, **kwargs: Any) -> Any:
        """Its ``run(cfg, **kwargs)`` on local folders (a stage that `uses` it calls
        this; drivers go through `dpsynth.drive.run_stage`)."""
        return self.load().run(cfg, **kwargs)

    @property
    def sections(self) -> tuple[str, ...]:
        """The config sections it reads (and records in its ``params.json``)."""
        return tuple(self.load().SECTIONS)

    def code(self) -> set[Path]:
        """Every dpsynth source file the stage runs: its module and all the dpsynth
        modules it imports, directly or not (read from the source, not imported),
        relative to the repository (``src/dpsynth/...``)."""
        files = {path.relative_to(SRC.parent) for path in
                 module_closure(f"dpsynth.stages.{self.module}").values()}
        return files.union(*(STAGES[name].code() for name in self.uses))


def _split(role: str, help_: str, **kw: object) -> Input:
    return Input(name=role, kwarg=f"{role}_dir", path=f"{ARTIFACTS}/prepare/{role}",
                 help=help_, **kw)


def _output(stage: str, name: str, kwarg: str, help_: str, **kw: object) -> Input:
    return Input(name=name, kwarg=kwarg, path=f"{ARTIFACTS}/{stage}", help=help_, **kw)


MODEL = _output("pretrain", "model", "model_dir", "the pre-trained model (artifacts/pretrain)")
DP_MODEL = _output("finetune", "dp_model", "dp_model_dir",
                   "the DP model (artifacts/finetune, with its privacy.json)")
SYNTHETIC = _output("sample", "synthetic", "synthetic_dir", "synthetic set from sample")
TEST = _split("test", "real test split from prepare")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage(name="prepare", module="prepare",
          produces="public/private/test shards + manifests",
          short="validate the raw sources; write public/private/test shards",
          description=("Read the raw sources (data.*) and write validated public/private/test "
                       "shards with manifests to --out."),
          reads_private=True),
    Stage(name="pretrain", module="pretrain", resumable=True,
          produces="EMA diffusion model (safetensors + config.json), loss.csv",
          short="train the diffusion model on the public split (not private)",
          description=("Train the diffusion model (non-private) on the public split; writes the "
                       "EMA model (safetensors + config.json) and loss curve to --out."),
          gpu=True, inputs=(
        _split("public", "public split from prepare"),)),
    Stage(name="finetune", module="finetune", resumable=True,
          produces="DP model (safetensors + config.json), privacy.json",
          short="DP-SGD fine-tuning on the private split (the only reader of it)",
          description=("Fine-tune the pre-trained model on the private split with DP-SGD (Poisson "
                       "sampling, per-example clipping of the K-averaged gradient, calibrated "
                       "Gaussian noise); checks the dataset's privacy ledger first. Writes the DP "
                       "model, privacy.json and metrics to --out."),
          gpu=True, reads_private=True, inputs=(
        MODEL, _split("private", "private split from prepare"),
        _split("public", "public split (only for the publishable monitoring loss)"))),
    Stage(name="sample", module="sample", resumable=True,
          produces="synthetic shards + manifest, grid.png",
          short="generate the synthetic dataset (sharded, resumable)",
          description=("Sample a synthetic dataset from a model into --out as shards + manifest + "
                       "per-class grid; resumes finished shards."),
          examples=("dpsynth sample --model M --out shards/3 --num-shards 8 --shard-index 3"
                    "   # one shard of a fan-out",
                    "dpsynth sample --merge shards/* --out artifacts/sample   # collect them"),
          gpu=True, inputs=(
        _output("finetune", "model", "model_dir",
                "the model to sample (artifacts/finetune; artifacts/pretrain for the "
                "public-only samples)"),)),
    Stage(name="fid", module="fid",
          produces="distances to the real test split, domain CNN",
          short="Frechet distance, KID, precision/recall vs the real test split",
          description=("Distribution distances between the synthetic set and the real test split: "
                       "Frechet distance, KID and precision/recall in each configured feature "
                       "space (fid_inception for Inception-v3, fd_<data>_cnn for the domain CNN "
                       "trained on the public split). Writes metrics.json and the domain CNN to "
                       "--out."),
          inputs=(
        SYNTHETIC, replace(TEST, aliases=("--reference",)),
        _split("public", "public split (trains the domain CNN; never the private one)"))),
    Stage(name="classify", module="classify",
          produces="accuracy vs number of synthetic samples, curve.png",
          short="accuracy of classifiers trained on synthetic data only",
          description=("Train WRN classifiers on growing subsets of the synthetic set and measure "
                       "their accuracy on the real test split (accuracy vs number of synthetic "
                       "samples); with classify.real_baseline also the non-private baseline "
                       "trained on the real private split (evaluation only, not covered by "
                       "epsilon)."),
          reads_private=True, inputs=(
        SYNTHETIC, TEST,
        _split("private", "private split, only for the non-private baseline",
               required=False))),
    Stage(name="baseline", module="baseline", uses=("sample", "classify", "fid"),
          produces="the public-only point (epsilon 0): the pre-trained model, scored alike",
          short="the public-only point: the pre-trained model sampled and scored alike",
          description=("The public-only point, in the same run: sample the pre-trained model "
                       "(public data only, epsilon 0) with the sample stage's settings and score "
                       "it with the classify and fid recipes on the real test split. Never reads "
                       "the private split. Writes metrics.json (public_only_*) and grid.png to "
                       "--out."),
          gpu=True, inputs=(
        MODEL, _split("public", "public split (trains the domain CNN, as in fid)"), TEST)),
    Stage(name="sweep", module="sweep", resumable=True,
          uses=("finetune", "sample", "classify", "fid"),
          produces="privacy-utility curve (curve.csv, curve.png), make sweep's extra DP points",
          short="the privacy-utility curve: fine-tune, sample and score at several epsilon",
          description=("The privacy-utility curve (paper Fig. 2): the public-only point (epsilon "
                       "0, from baseline), this run's DP model (from classify and fid), and one "
                       "more DP fine-tuning run per other target epsilon in sweep.epsilons (every "
                       "other setting the run's), each sampled and scored like the public-only "
                       "baseline, against the real-data baseline. The extra runs are reserved in "
                       "the privacy ledger at once, before any trains; the sweep is refused whole "
                       "past the dataset's budget. Writes curve.csv, curve.png, metrics.json and "
                       "each extra point's DP model to --out; the report shows the curve."),
          examples=("dpsynth sweep ... --set 'sweep.epsilons=[1, 2, 5, 10]'"
                    "   # three more DP runs",),
          gpu=True, reads_private=True, inputs=(
        MODEL, DP_MODEL, _split("private", "private split from prepare"),
        _split("public", "public split (monitoring loss, domain CNN)"), TEST,
        _output("baseline", "baseline", "baseline_dir",
                "the baseline stage's output: the public-only point (epsilon 0)"),
        _output("classify", "classify", "classify_dir",
                "the classify stage's output: this run's point and the real-data line"),
        _output("fid", "fid", "fid_dir",
                "the fid stage's output: this run's point's Frechet distance"))),
    Stage(name="rank", module="rank",
          produces="synthetic vs real ranking, scatter.png, champion classifier",
          short="rank classifier settings on synthetic data; register the champion",
          description=("Train the rank.grid of classifier configurations on synthetic data, "
                       "choose on synthetic validation, and report how well the synthetic ranking "
                       "holds on the real test split (Spearman, Kendall, regret). Registers the "
                       "chosen classifier as dpsynth-classifier@champion and the DP model as "
                       "dpsynth-generator in MLflow."),
          inputs=(
        SYNTHETIC, TEST,
        replace(DP_MODEL, help="the DP model (finetune output) to register as dpsynth-generator",
                aliases=("--generator",)))),
    Stage(name="audit", module="audit",
          produces=("canary membership audit (epsilon lower bound vs claim), memorization, "
                    "roc.png"),
          short="empirical privacy check: canary membership audit, memorization",
          description=("Check the DP guarantee empirically: a canary membership audit in one "
                       "training run (Steinke, Nasr & Jagielski 2023) of a twin of the "
                       "fine-tuning run on public canaries (epsilon lower bound at "
                       "audit.confidence, TPR at low FPR), with a non-private control that shows "
                       "the audit's power; and memorization of the private split by the generated "
                       "samples (aggregates only). Writes metrics.json and roc.png to --out."),
          gpu=True, reads_private=True, inputs=(
        _output("pretrain", "model", "model_dir",
                "pre-trained model the fine-tuning started from (the twin's start)"),
        replace(DP_MODEL, help="the DP model (finetune output): its privacy.json is the claim",
                aliases=("--generator",)),
        SYNTHETIC, _split("private", "private split (memorization only; aggregates leave)"),
        replace(TEST, help="real data not trained on (the test split from prepare)",
                aliases=("--heldout",)))),
    Stage(name="report", module="report",
          produces="one self-contained HTML page (index.html)",
          short="one self-contained HTML report of the whole run, for the data owner",
          description=("Write one self-contained HTML page about the run for the data owner "
                       "(index.html, every image embedded): the privacy guarantee in plain words "
                       "and its numbers (epsilon, delta, accountant, sampling, C, K, steps, the "
                       "runs the privacy ledger records against the dataset's budget), synthetic "
                       "samples per class next to real test-split images (never private ones), "
                       "fidelity, downstream accuracy, the ranking check, training curves, the "
                       "audit, and the data's provenance. Reads the stage outputs under "
                       "--artifacts (a missing optional stage gets a 'not run' section); the "
                       "private split's images only to find its privacy ledger (a hash of them "
                       "keys it). Withholds the private split's size and what reveals it: the "
                       "ledger's composed epsilon, and q and sigma unless "
                       "report.disclose_private_size."),
          examples=("dpsynth report --config params.yaml --artifacts s3://my-bucket/run1 "
                    "--out s3://my-bucket/run1/report",)),
)}


def _module_file(module: str) -> Path | None:
    path = SRC.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """The dpsynth modules `path` (module `module`) imports anywhere in its code:
    ``from a.b import c`` counts ``a.b`` and ``a.b.c`` (c may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] == "dpsynth"}


def module_closure(module: str) -> dict[str, Path]:
    """`module` and every dpsynth module it imports, transitively (with the
    packages above each, which Python runs first): module name -> source file."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(name)) is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports(path, name))
    return seen


def stage(name: str) -> Stage:
    """The row of stage `name`."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}") from None
