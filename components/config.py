"""Configuration components: resolve the run's config once, and list the sampling shards."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.images import CPU_IMAGE
from components.runtime import load_config


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_config(
    config: Output[Artifact],
    base_config: str,
    ledger_dir: str,
    overrides: List[str],
):
    """Validate the run's configuration and write it, resolved, as YAML to `config`.

    `base_config` is a whole config file (params.yaml or configs/*.yaml). `overrides`
    are `key=value` strings, the same as `dpsynth --set` and `dvc exp run -S` take
    (`finetune.epsilon=5`, `data.private={kind: cifar10, path: s3://b/c.tar.gz}`,
    `data.test=null` to carve the test split out of the private pool), applied in
    order; `privacy.ledger_dir=<ledger_dir>` comes last, so that no run can put the
    ledger on a pod's ephemeral disk.

    Every stage reads this one resolved config, so a typo fails here, in seconds,
    before any GPU is requested. (It is an artifact, not a string output, because
    kfp.local 2.17 hands a ParallelFor body the loop item in place of any task
    output parameter it consumes; see components/README.md.)
    """
    import json
    import os
    import tempfile

    import yaml

    from dpsynth.config import load

    sets = list(overrides)
    if not (os.path.isabs(ledger_dir) or ledger_dir.startswith("s3://")):
        raise ValueError(f"ledger_dir={ledger_dir!r}: must be durable storage, an absolute "
                         "path (a PVC mount) or an s3:// prefix; the privacy ledger is the "
                         "record of the budget spent on each private dataset")
    sets.append("privacy.ledger_dir=" + json.dumps(ledger_dir))

    # config.load reads YAML as the CLI does (e.g. `1e-3` is a number)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "base.yaml")
        with open(path, "w") as f:
            f.write(base_config)
        cfg = load(path, sets)
    tracking = cfg.tracking
    local_sqlite = (tracking.tracking_uri.startswith("sqlite:///")
                    and not tracking.tracking_uri.startswith("sqlite:////"))
    if (tracking.enabled and local_sqlite and os.environ.get("KUBERNETES_SERVICE_HOST")
            and not os.environ.get("MLFLOW_TRACKING_URI")):
        raise ValueError("tracking is on but MLFLOW_TRACKING_URI is not set, so every stage "
                         f"would log to {tracking.tracking_uri} on its pod's ephemeral disk: "
                         "create the MLflow Secret the pipeline reads (pipelines/README.md) "
                         "or pass overrides=['tracking.enabled=false']")
    print("overrides applied:", *sets, sep="\n  ")
    with open(config.path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, additional_funcs=[load_config])
def shard_indices(config: Input[Artifact]) -> List[int]:
    """The sampling shards to fan out over: 0 .. sample.num_shards - 1."""
    return list(range(load_config(config.path).sample.num_shards))
