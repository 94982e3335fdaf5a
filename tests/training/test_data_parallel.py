"""Data parallelism under torchrun (gloo workers on the CPU) gives the one-process
run: pre-training splits its global batch over the workers and sums their
gradients, resumes on every worker from rank 0's checkpoint; across two
torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1, as two nodes of a
cluster job would) pre-training and DP fine-tuning give the same weights, the
same privacy.json and one privacy ledger entry (the noise added once per step)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpsynth import config
from dpsynth.io.shards import write_dataset
from dpsynth.stages import finetune, pretrain
from dpsynth.tracking import NullTracker

HERE = Path(__file__).parent
WORKER = str(HERE / "ddp_worker.py")
SETTINGS = [
    "model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.attention_levels=[1]",
    "diffusion.num_train_timesteps=100", "finetune.timesteps={kind: uniform}",
    "pretrain.steps=6", "pretrain.batch_size=8", "pretrain.warmup_steps=2",
    "pretrain.checkpoint_every=3", "pretrain.log_every=3",
    "finetune.steps=3", "finetune.batch_size=24", "finetune.physical_batch_size=8",
    "finetune.aug_multiplicity=2", "finetune.accountant=rdp", "finetune.noise_seed=11",
    "finetune.checkpoint_every=3", "finetune.log_every=3", "tracking.enabled=false"]


def _env(tmp: Path) -> dict[str, str]:
    src = str(Path(config.__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _check(procs: list[subprocess.Popen]) -> str:
    logs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        logs.append(out)
        assert proc.returncode == 0, out[-4000:]
    return "\n".join(logs)


def torchrun_standalone(tmp: Path, *args: str, nproc: int = 2) -> str:
    """`nproc` workers on this machine (`--standalone --nproc-per-node 2`)."""
    return _check([subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc),
         WORKER, *args], cwd=tmp, env=_env(tmp), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)])


def torchrun_two_nodes(tmp: Path, *args: str) -> str:
    """Two torchrun agents of one worker each, as two nodes: c10d rendezvous on
    127.0.0.1 (the agents find each other there, as a job's nodes do at the
    rendezvous endpoint the operator gives them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return _check([subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dpsynth",
         "--local-addr", "127.0.0.1", WORKER, *args], cwd=tmp, env=_env(tmp),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The splits, a config file per run (its own ledger), and the one-process runs."""
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("ddp")
    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    classes = [str(k) for k in range(10)]
    write_dataset(tmp / "data" / "public", images[:200], d.target[:200], classes, "digits")
    write_dataset(tmp / "data" / "private", images[200:500], d.target[200:500], classes,
                  "digits")
    paths = {"tmp": tmp, "data": tmp / "data"}
    for name in ("one", "two", "nodes", "single"):
        cfg = config.from_dict({}, [*SETTINGS, f"privacy.ledger_dir={tmp / name / 'ledger'}"])
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg.to_dict()))
    torch.set_num_threads(1)
    cfg = config.load(paths["one"])
    pretrain.run(cfg, public_dir=paths["data"] / "public", out_dir=tmp / "one" / "pre",
                 tracker=NullTracker())
    finetune.run(cfg, model_dir=tmp / "one" / "pre", private_dir=paths["data"] / "private",
                 public_dir=paths["data"] / "public", out_dir=tmp / "one" / "dp",
                 tracker=NullTracker())
    return paths


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("to_k.bias"):
            # softmax attention ignores a shift shared by all keys: this bias's true
            # gradient is 0, and Adam scales the rounding noise of either summation
            # order up to a full step, in a random direction
            continue
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5, msg=k)


def test_pretraining_on_two_workers_takes_the_one_process_steps_and_resumes(
        setup: dict[str, Path]) -> None:
    tmp, out = setup["tmp"], setup["tmp"] / "two"
    torchrun_standalone(tmp, str(setup["two"]), str(setup["data"]), str(out), "pretrain:3")
    assert not (out / "pre").exists()  # stopped: nothing published, a checkpoint kept
    log = torchrun_standalone(tmp, str(setup["two"]), str(setup["data"]), str(out), "pretrain")
    assert log.count("resuming pre-training from step 3") == 2  # both workers
    assert json.loads((out / "pre" / "metrics.json").read_text())["resumed_from_step"] == 3
    assert_same_weights(setup["tmp"] / "one" / "pre", out / "pre")
    one, two = ((p / "pre" / "loss.csv").read_text().splitlines() for p in (tmp / "one", out))
    assert [r.split(",")[0] for r in one] == [r.split(",")[0] for r in two]  # steps logged
    np.testing.assert_allclose([float(r.split(",")[1]) for r in one[1:]],
                               [float(r.split(",")[1]) for r in two[1:]], rtol=1e-5)
    # rank 0 alone published: the same files as one process, none from a second writer
    assert sorted(p.name for p in (out / "pre").iterdir()) == sorted(
        p.name for p in (tmp / "one" / "pre").iterdir())


def test_one_torchrun_worker_joins_a_group_of_one_and_trains_as_one_process(
        setup: dict[str, Path]) -> None:
    """torchrun with one worker (one GPU per job): the collectives run through a
    process group of one (NCCL on a GPU) and change nothing."""
    tmp, out = setup["tmp"], setup["tmp"] / "single"
    log = torchrun_standalone(tmp, str(setup["single"]), str(setup["data"]), str(out), "both",
                              nproc=1)
    assert "process group: gloo" in log
    for stage in ("pre", "dp"):
        assert_same_weights(tmp / "one" / stage, out / stage)
    assert (json.loads((out / "dp" / "privacy.json").read_text())
            == json.loads((tmp / "one" / "dp" / "privacy.json").read_text()))


def test_two_nodes_pretrain_and_fine_tune_as_one_process(setup: dict[str, Path]) -> None:
    tmp, out = setup["tmp"], setup["tmp"] / "nodes"
    torchrun_two_nodes(tmp, str(setup["nodes"]), str(setup["data"]), str(out), "both")
    assert_same_weights(tmp / "one" / "pre", out / "pre")
    assert_same_weights(tmp / "one" / "dp", out / "dp")
    one, two = (json.loads((p / "dp" / "privacy.json").read_text()) for p in (tmp / "one", out))
    assert one == two  # epsilon, sigma, q, steps: the same guarantee
    ledgers = list((out / "ledger").glob("*.json"))
    assert len(ledgers) == 1 and len(json.loads(ledgers[0].read_text())["entries"]) == 1
