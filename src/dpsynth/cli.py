"""`dpsynth <stage>`: parse arguments, build the config, call the stage's `run`.

No logic lives here. Exit codes: 0 ok, 2 usage or bad input, 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dpsynth import __version__, config, threads
from dpsynth.choices import ACCOUNTANTS
from dpsynth.errors import DpsynthError, InputError
from dpsynth.stages import registry
from dpsynth.submit import DEFAULT_EXPERIMENT, DEFAULT_PACKAGE
from dpsynth.tracking import open_tracker

EXAMPLES = {  # the stages' examples are in the registry (dpsynth.stages.registry)
    "submit": "dpsynth submit --host http://localhost:8080 --set finetune.epsilon=5\n"
              "  dpsynth submit --host https://kubeflow.example.com/pipeline --namespace team-a "
              "--schedule '0 3 * * *'   # daily at 03:00, scheduler time",
    "mlflow-server": "dpsynth mlflow-server --artifacts-destination s3://my-bucket/mlflow "
                     "--port 5000\n  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   "
                     "# then run stages as usual",
    "config": "dpsynth config resolve configs/cifar10.yaml -o params.yaml   # then dvc repro\n"
              "  dpsynth config diff params.yaml   # what it sets differently from the defaults",
    "plan": "dpsynth plan --config params.yaml --dataset-size 990\n"
            "  dpsynth plan --config params.yaml --dataset-size 990 --noise-multiplier 1.2 "
            "--accountant rdp   # epsilon for a given sigma\n"
            "  dpsynth plan --dataset-size 50000 --batch-size 4096 --epochs 200 --epsilon 10 "
            "--device H100-SXM --json",
}


# One line per command for `dpsynth --help`; each command's own --help says more.
SHORT = {  # and the stages' in the registry
    "submit": "submit the Kubeflow pipeline to a cluster (a run or a schedule)",
    "mlflow-server": "run a shared MLflow tracking server",
    "plan": "privacy budget and compute of a fine-tuning run, before running it",
    "config": "a config file resolved (every field, for DVC) or as overrides of the defaults",
}

# Stage arguments that name a folder a stage reads; each may be an s3:// URI.
INPUT_ARGS = tuple(sorted({i.name for row in registry.STAGES.values() for i in row.inputs}))


def _location(value: str) -> str | Path:
    """A folder argument: `s3://` URIs stay strings (a Path would turn `//` into `/`)."""
    from dpsynth.io.s3 import is_s3

    return value if is_s3(value) else Path(value)


@contextlib.contextmanager
def _stage_io(args: argparse.Namespace, cfg: config.Config) -> Iterator[None]:
    """Stage the I/O of an unchanged stage: each s3:// input becomes its verified
    local copy and --out a local folder published to S3 when the stage succeeds,
    with the stage's work folder mirrored for resumption (dpsynth.io.work).
    Local paths pass through untouched."""
    from dpsynth.io import published, s3, work

    s3.configure(cfg.storage)
    with contextlib.ExitStack() as stack:
        for name in INPUT_ARGS:
            if getattr(args, name, None) is not None:
                setattr(args, name, stack.enter_context(published.local_input(getattr(args, name))))
        if getattr(args, "merge", None):
            args.merge = [stack.enter_context(published.local_input(m)) for m in args.merge]
        uri = args.out
        staged = stack.enter_context(work.publish(uri))
        args.out, args.sync_work = staged.path, staged.sync
        yield
    if s3.is_s3(uri):
        print(f"{args.command}: published {uri}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (params.yaml or configs/*.yaml); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pretrain.steps=100 (repeatable)")
    p.add_argument("--out", type=_location, required=True,
                   help="output folder or s3:// URI (published atomically)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _run_stage(args: argparse.Namespace, cfg: config.Config) -> None:
    """A stage command: its registered inputs from their flags, through the one
    driver path (`dpsynth.drive`), and the stage's one-line summary."""
    from dpsynth import drive
    from dpsynth.io.s3 import is_s3

    row = registry.stage(args.command)
    options = {"resume": args.resume} if "resume" in vars(args) else {}
    result = drive.run_stage(row.name, cfg, inputs={i.name: getattr(args, i.name)
                                                    for i in row.inputs},
                             out_dir=args.out, **options)
    if drive.is_main_process():
        print(f"{row.name}: {row.load().summary(result, cfg)}")
        if is_s3(args.out):
            print(f"{row.name}: published {args.out}")


def _sample(args: argparse.Namespace, cfg: config.Config) -> None:
    from dpsynth.stages import sample

    if args.model is None:
        raise InputError("dpsynth sample: --model is required (e.g. --model artifacts/finetune"
                         "; with --merge, the model the shards were sampled from)")
    if args.merge:  # as the Kubeflow merge: shards, manifest, grid, privacy.json, metrics
        with open_tracker(cfg.tracking, "sample") as tracker:
            tracker.log_params(sample.tracked_params(cfg, args.model))
            result = sample.publish(cfg, shard_dirs=args.merge, model_dir=args.model,
                                    out_dir=args.out, tracker=tracker,
                                    made=range(cfg.sample.num_shards), skipped=(), seconds=None)
        print(f"sample: merged {len(result.manifest.shards)} shards ({result.manifest.count} "
              f"images) into {args.out}")
        return
    if args.shard_index:
        made, skipped = sample.make_shards(cfg, model_dir=args.model, shard_dir=args.out,
                                           indices=args.shard_index)
        print(f"sample: made shards {made}, skipped finished {skipped}, in {args.out}")
        return
    with open_tracker(cfg.tracking, "sample") as tracker:
        result = sample.run(cfg, model_dir=args.model, out_dir=args.out, tracker=tracker,
                            sync_work=args.sync_work)
    print(f"sample: {result.manifest.count} images in {len(result.manifest.shards)} shards "
          f"({len(result.shards_skipped)} resumed), grid at {result.out_dir / 'grid.png'}")


def _published(root: str, rel: str) -> bool:
    """Whether the stage output `rel` exists under an artifacts root: a folder, or on
    S3 the completion marker of the output that holds it (`prepare` for `prepare/test`)."""
    from dpsynth.io import published, s3, work

    if not s3.is_s3(root):
        return (Path(root) / rel).is_dir()
    top = f"{root}/{rel.split('/')[0]}/{published.MARKER}"
    return s3.read_versioned(top)[0] is not None


def _copy_split(uri: str, folder: Path) -> None:
    """Copy the manifest and shards of the split at `uri` into `folder` (the reader,
    `read_dataset`, verifies each shard against the manifest)."""
    from dpsynth.io import published, s3, work
    from dpsynth.io.shards import MANIFEST, read_manifest

    (folder / MANIFEST).write_bytes(s3.read_bytes(f"{uri}/{MANIFEST}"))
    for shard in read_manifest(folder).shards:
        if Path(shard.file).name != shard.file or shard.file in ("", ".", ".."):
            raise InputError(f"{uri}/{MANIFEST}: shard file {shard.file!r} is not a plain "
                             "file name; re-run the stage that wrote it")
        (folder / shard.file).write_bytes(s3.read_bytes(f"{uri}/{shard.file}"))


def _report(args: argparse.Namespace, cfg: config.Config) -> None:
    import tempfile

    from dpsynth.io import published, s3, work
    from dpsynth.stages import report

    root = str(args.artifacts).rstrip("/")
    with contextlib.ExitStack() as stack:
        # every stage output the root holds (s3: a verified local copy); the private
        # split only to key the privacy ledger by its images (s3: a temporary copy,
        # removed on exit, never the shared cache)
        folders = {name: stack.enter_context(published.local_input(f"{root}/{rel}"))
                   for name, rel in report.LAYOUT.items() if _published(root, rel)}
        private: Path | None = Path(root) / report.PRIVATE
        if s3.is_s3(root):
            private = None
            if _published(root, report.PRIVATE):
                private = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                _copy_split(f"{root}/{report.PRIVATE}", private)
        elif not (Path(root) / report.PRIVATE_MANIFEST).is_file():
            private = None
        with open_tracker(cfg.tracking, "report") as tracker:
            result = report.run(cfg, artifacts=folders, private_dir=private,
                                out_dir=args.out, tracker=tracker)
    missing = f"; not run: {', '.join(result.not_run)}" if result.not_run else ""
    print(f"report: {result.index} (epsilon={result.epsilon:.2f}, {result.images} images"
          f"{missing})")


def _submit(args: argparse.Namespace) -> None:
    from dpsynth.submit import base_config_text, parse_param_args, submit

    host = args.host or os.environ.get("KF_PIPELINES_ENDPOINT")
    if not host:
        raise InputError("--host URL of the KFP API is required (or set KF_PIPELINES_ENDPOINT)")
    params = parse_param_args(args.param)
    if args.config is not None:
        if "base_config" in params:
            raise InputError("give the base config once: --config FILE or --param base_config=")
        params["base_config"] = base_config_text(args.config)
    result = submit(args.package, host=host, experiment=args.experiment,
                    params=params, schedule=args.schedule,
                    run_name=args.run_name, namespace=args.namespace, sets=args.overrides)
    shown = ", ".join(f"{k}={v!r}" for k, v in result.params.items()) or "defaults"
    if result.kind == "run":
        print(f"submit: run {result.id} ({result.name}) in experiment {result.experiment} "
              f"with {shown}\n  {result.url}")
    else:
        print(f"submit: recurring run {result.id} ({result.name}), cron '{result.schedule}', "
              f"in experiment {result.experiment} with {shown}\n  {result.url}")


def _mlflow_server(args: argparse.Namespace) -> None:
    from dpsynth.mlflow_server import serve, server_command

    cmd = server_command(artifacts_destination=args.artifacts_destination,
                         backend_store_uri=args.backend_store_uri, host=args.host,
                         port=args.port, workers=args.workers, basic_auth=args.basic_auth,
                         allowed_hosts=args.allowed_hosts)
    auth = "basic auth" if args.basic_auth else "NO authentication"
    print(f"mlflow-server: http://{args.host}:{args.port} ({auth}), artifacts in "
          f"{args.artifacts_destination}; clients: export "
          f"MLFLOW_TRACKING_URI=http://{args.host}:{args.port}")
    serve(cmd)


def _summary(args: argparse.Namespace) -> None:
    from dpsynth.summary import summarize

    print(summarize(args.artifacts, args.seconds))


def _config(args: argparse.Namespace) -> None:
    """`dpsynth config resolve|diff`: the file (plus --set) resolved, or its overrides."""
    from dpsynth.io.atomic import atomic_write_bytes

    cfg = config.load(args.file, args.overrides)
    source = " ".join([str(args.file) if args.file else "the defaults",
                       *(f"--set {o}" for o in args.overrides)])
    if args.action == "resolve":
        text = config.resolved_yaml(cfg, header=(
            f"Resolved from {source} by `dpsynth config resolve`: every field explicit,\n"
            "as DVC reads it. Edit the source file and resolve again, or use\n"
            "`dvc exp run -S key=value`."))
    else:
        text = config.to_yaml(config.differences(cfg))
    if args.out is None:
        sys.stdout.write(text)
    else:
        atomic_write_bytes(args.out, text.encode())  # a failed write leaves the old file
        print(f"wrote {args.out} ({args.action} of {source})", file=sys.stderr)


def _plan(args: argparse.Namespace) -> None:
    import json

    from dpsynth import plan

    cfg = plan.with_flags(config.load(args.config, args.overrides),
                          batch_size=args.batch_size, steps=args.steps,
                          aug_multiplicity=args.aug_multiplicity, epsilon=args.epsilon,
                          delta=args.delta, accountant=args.accountant,
                          max_grad_norm=args.max_grad_norm)
    result = plan.plan_run(cfg, dataset_size=args.dataset_size, epochs=args.epochs,
                           noise_multiplier=args.noise_multiplier, num_classes=args.num_classes,
                           device=args.device, precision=args.precision, mfu=args.mfu,
                           whole_run=args.config is not None)
    if args.json:
        print(json.dumps({"config": None if args.config is None else str(args.config),
                          **result.to_json()}, indent=2))
    else:
        print(f"dpsynth plan: {args.config or 'code defaults (no --config)'}\n"
              + plan.render(result))


PLAN_HELP = (
    "Plan a DP fine-tuning run before running it. Reads no data and writes nothing.\n\n"
    "inputs: the private split's size N (--dataset-size; printed back to you, stored "
    "nowhere)\n  and the settings: --config (model, data, finetune, pretrain, sample), "
    "then the flags.\n"
    "outputs (a table, or JSON with --json):\n"
    "  privacy: q = B/N, steps and epochs, the noise multiplier sigma that `dpsynth "
    "finetune`\n    would calibrate for the target (epsilon, delta) with the same "
    "accountant code, or\n    with --noise-multiplier the epsilon of that sigma;\n"
    "  noise vs signal: sigma/B per coordinate and sigma*sqrt(d)/B in norm (d = UNet "
    "parameters);\n"
    "  compute: the configured UNet's FLOPs per image (counted, not guessed), x B x K x "
    "steps,\n    as GPU-hours on --device at the assumed utilisation --mfu; with "
    "--config also\n    pre-training and sampling;\n"
    "  warnings: delta not well below 1/N, high sample rate, noise that drowns any "
    "signal,\n    memory. delta >= 1/N or B > N is an error (exit 2), as in training.")


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    """`dpsynth plan`'s flags: each overrides the --config value of the same name."""
    from dpsynth.gpus import DEFAULT_DEVICE, DEVICES, MFU_BY_PRECISION

    p.add_argument("--config", type=Path, default=None,
                   help="YAML config (params.yaml or configs/*.yaml); code defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.layers_per_block=2")
    p.add_argument("--dataset-size", type=int, required=True, metavar="N",
                   help="images in the private split (private: never in a config)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="expected batch (finetune.batch_size)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="S", help="DP-SGD steps (finetune.steps)")
    length.add_argument("--epochs", type=float, metavar="E",
                        help="instead of --steps: S = ceil(E*N/B)")
    p.add_argument("--aug-multiplicity", type=int, metavar="K",
                   help="copies per example (finetune.aug_multiplicity)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--epsilon", type=float, help="target epsilon (finetune.epsilon)")
    target.add_argument("--noise-multiplier", type=float, metavar="SIGMA",
                        help="the inverse: report epsilon for this sigma")
    p.add_argument("--delta", type=float, help="finetune.delta")
    p.add_argument("--accountant", choices=tuple(ACCOUNTANTS), help="finetune.accountant")
    p.add_argument("--max-grad-norm", type=float, metavar="C", help="finetune.max_grad_norm")
    p.add_argument("--num-classes", type=int, default=10,
                   help="classes of the private data (default: %(default)s)")
    p.add_argument("--device", choices=tuple(DEVICES), default=DEFAULT_DEVICE,
                   help="GPU for the GPU-hours (default: %(default)s)")
    p.add_argument("--precision", choices=("tf32", "bf16"), default=None,
                   help="peak to use: tf32 for finetune.precision=fp32 (float32; cuDNN "
                        "convolutions in TF32), bf16 for bf16 autocast (default: the "
                        "config's finetune.precision)")
    mfus = ", ".join(f"{k} {v:g}" for k, v in MFU_BY_PRECISION.items())
    p.add_argument("--mfu", type=float, default=None,
                   help=f"assumed fraction of peak reached (default, measured: {mfus})")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpsynth", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Differentially private synthetic images with diffusion models.\n"
                    "Stages: prepare -> pretrain -> finetune (DP) -> sample -> fid, classify, "
                    "rank, audit -> report (run them all with `dvc repro`).",
        epilog="examples:\n"
               "  make run                      # the whole pipeline (dvc repro) on the "
               "embedded digits\n"
               "  dpsynth finetune --help       # what a stage reads, writes, and an example\n"
               "  dpsynth finetune --config params.yaml --set finetune.epsilon=5 ...\n\n"
               "Every stage takes --config FILE, --set KEY=VALUE (repeatable), --out DIR or "
               "s3:// URI,\nand -q/--quiet (no progress bars, warnings only).\n"
               "exit codes: 0 ok, 2 usage or bad input (the message names the input and "
               "the fix),\n1 failure (e.g. training diverged), 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"dpsynth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")

    def add(name: str, help_: str, fn: Callable, common: bool = True,
            short: str | None = None) -> argparse.ArgumentParser:
        """A subcommand: `short` in the command list, `help_` on its own --help page."""
        p = sub.add_parser(name, help=short or SHORT.get(name, help_), description=help_,
                           epilog="example:\n  " + EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if common:  # the stages' --config/--set/--out/-q
            _common(p)
        p.set_defaults(fn=fn)
        return p

    def add_stage(name: str, fn: Callable = _run_stage) -> argparse.ArgumentParser:
        """A stage command: its registered inputs (each folder may be an s3:// URI)."""
        row = registry.stage(name)
        p = sub.add_parser(name, help=row.short, description=row.description,
                           epilog="example:\n  " + row.example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        for i in row.inputs:
            p.add_argument(i.flag, *i.aliases, dest=i.name, type=_location, metavar="DIR",
                           required=i.required and fn is _run_stage, default=None,
                           help=i.help)
        p.set_defaults(fn=fn)
        return p

    add_stage("prepare")
    for name in ("pretrain", "finetune"):
        add_stage(name).add_argument(
            "--resume", action=argparse.BooleanOptionalAction, default=True,
            help="continue from the latest compatible checkpoint (for finetune, the same "
                 "run and its accounting) (default: yes)")
    p = add_stage("sample", _sample)
    p.add_argument("--num-shards", type=int, help="override sample.num_shards")
    p.add_argument("--shard-index", type=int, action="append", default=[],
                   help="make only this shard (repeatable) into --out, without a manifest")
    p.add_argument("--merge", type=_location, nargs="+", metavar="DIR",
                   help="collect shards made with --shard-index from these folders")
    for name in ("fid", "classify", "baseline", "sweep", "rank", "audit"):
        add_stage(name)
    p = add_stage("report", _report)
    p.add_argument("--artifacts", type=_location, default=Path("artifacts"),
                   help="folder or s3:// prefix holding the stage outputs as `dvc repro` "
                        "lays them out: prepare/{public,test}, pretrain, finetune, sample, "
                        "fid, classify, baseline, sweep, rank, audit (default: %(default)s)")
    p = add("submit", "Submit the compiled Kubeflow pipeline (make pipeline) to a KFP API "
            "server: one run, or with --schedule a recurring run. Parameters are checked "
            "against the package before anything is sent. A token, if the API needs one, is "
            "read from the file named by $KF_PIPELINES_SA_TOKEN_PATH (in a pod: the "
            "projected service-account token), never from the command line.", _submit,
            common=False)
    p.add_argument("--host", default=None,
                   help="http(s) URL of the KFP API (default: $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--package", type=Path, default=DEFAULT_PACKAGE,
                   help="compiled pipeline YAML (default: %(default)s, from `make pipeline`)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                   help="KFP experiment, created if missing (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline argument (repeatable); the value is read as YAML and must "
                        "match the parameter's type in the package")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the run's base config (e.g. configs/cifar10.yaml), resolved here and "
                        "sent as the pipeline's base_config (default: the package's, "
                        "params.yaml at compile time)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config setting for the run (repeatable), as `dpsynth --set` and `dvc "
                        "exp run -S`: appended to the pipeline's `overrides` and checked "
                        "against its base config before anything is sent")
    p.add_argument("--schedule", default=None, metavar="CRON",
                   help="make a recurring run: cron with 5 fields ('0 3 * * *', a seconds "
                        "field 0 is prepended) or KFP's 6 with seconds first ('0 0 3 * * *')")
    p.add_argument("--run-name", default=None,
                   help="display name (default: pipeline name + UTC time, or + the schedule)")
    p.add_argument("--namespace", default=None,
                   help="Kubernetes namespace (multi-user Kubeflow); omit for single-user")
    p = add("mlflow-server", "Run a shared MLflow tracking server (UI, REST API, model "
            "registry): runs in a SQLite or Postgres database, artifacts proxied to S3. Binds "
            "to 127.0.0.1 with no authentication unless --basic-auth. S3 credentials come "
            "from the standard AWS chain (env, ~/.aws, the pod's role), never from flags.",
            _mlflow_server, common=False)
    p.add_argument("--artifacts-destination", default=os.environ.get(
        "MLFLOW_ARTIFACTS_DESTINATION"), metavar="URI",
        help="where artifacts are stored, e.g. s3://my-bucket/mlflow "
             "(default: $MLFLOW_ARTIFACTS_DESTINATION)")
    p.add_argument("--backend-store-uri", default=None, metavar="URI",
                   help="runs/registry database (default: $MLFLOW_BACKEND_STORE_URI, else "
                        "sqlite:///mlflow-server.db); a URI with a password goes in that "
                        "variable, not here")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--basic-auth", action="store_true",
                   help="enable MLflow's basic-auth app (users, passwords, permissions)")
    p.add_argument("--allowed-hosts", default=None,
                   help="Host headers to accept when served beyond localhost")
    _plan_arguments(add("plan", PLAN_HELP, _plan, common=False))
    p = add("config", "Show a config: `resolve` writes FILE (default: the code defaults) with "
            "--set applied and every field explicit, as DVC needs params.yaml (configs/*.yaml "
            "hold only what differs from the defaults); `diff` writes only what differs from "
            "the defaults, as the files in configs/ do.", _config, common=False)
    p.add_argument("action", choices=("resolve", "diff"), help="resolve or diff")
    p.add_argument("file", nargs="?", type=Path, default=None, metavar="FILE",
                   help="YAML config, e.g. configs/cifar10.yaml (default: the code defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (repeatable), as the stages' --set")
    p.add_argument("-o", "--out", type=Path, default=None, metavar="FILE",
                   help="write here (atomically) instead of stdout, e.g. params.yaml")
    p = sub.add_parser("summary", help="print what the pipeline produced and how to view it",
                       description="Print each stage's output folder and headline metrics, "
                                   "and how to open MLflow and the DVC plots.",
                       epilog="example:\n  dpsynth summary --artifacts artifacts",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help="the stage output folders (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None, help="wall time to report")
    p.set_defaults(fn=None)
    return parser


def _one_line(err: BaseException) -> str:
    """The message on one line, without terminal escapes: some wrapped library
    errors (PyYAML, tarfile, torch) span lines or carry colour codes, and a log
    line (DVC, Kubeflow) should hold the whole error."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "summary":
        _summary(args)
        return 0
    try:
        if args.command == "submit":  # talks to a server; no stage config
            _submit(args)
            return 0
        if args.command == "plan":  # prints a plan; reads no data, writes nothing
            _plan(args)
            return 0
        if args.command == "config":  # prints or writes a config file; runs no stage
            _config(args)
            return 0
        if args.command == "mlflow-server":  # runs a server; no stage config
            _mlflow_server(args)
            return 0
        if args.quiet:
            os.environ["TQDM_DISABLE"] = "1"
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        overrides = list(args.overrides)
        if getattr(args, "num_shards", None) is not None:
            overrides.append(f"sample.num_shards={args.num_shards}")
        cfg = config.load(args.config, overrides)
        threads.configure()  # before torch is imported: the OpenMP wait policy
        if args.fn is _run_stage:  # stages its own inputs and output (dpsynth.drive)
            _run_stage(args, cfg)
        else:
            with _stage_io(args, cfg):
                args.fn(args, cfg)
    except InputError as err:
        print(f"dpsynth {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except DpsynthError as err:
        print(f"dpsynth {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dpsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
