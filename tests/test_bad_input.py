"""The bad-input matrix: every row is one bad input given to the real CLI
(`dpsynth.cli.main`), the clear error it must give, and the check that nothing
was written (DESIGN.md "Data sources", STYLE.md habit 10).

For each row: exit code 2, one `dpsynth <stage>: error: ...` message naming the
input (path or config field) and the fix, no traceback; the stage's `--out`
folder and its work folder do not exist, and every file under the test's
folder (the valid inputs, the config, the privacy ledger with one earlier run)
is byte-for-byte unchanged. Malicious pickles would create a marker file when
unpickled; the marker must not exist afterwards (and a control test shows that
unpickling them really does create it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from dpsynth import cli
from dpsynth.config import ModelConfig
from dpsynth.data.roles import carved_source
from dpsynth.diffusion.unet import EMA_WEIGHTS, WEIGHTS, UNetSpec, build_unet, save_model
from dpsynth.io.shards import MANIFEST, encode_shard, read_dataset, read_manifest, write_dataset
from dpsynth.privacy.ledger import PrivacyLedger, dataset_key

if str(Path(__file__).parent / "data") not in sys.path:  # tests/data/raw_formats.py
    sys.path.insert(0, str(Path(__file__).parent / "data"))
from raw_formats import (camelyon_rows, cifar_members, py2_pickle,  # noqa: E402
                         write_camelyon17, write_imagefolder, write_imagenet32, write_tarball)

CLASSES = tuple(str(k) for k in range(10))
NUM_PRIVATE = 300
MARKER = "PWNED"  # what the malicious pickles create, in the test's folder
LEDGER = "inputs/ledger"

# The tiny config every row starts from (relative paths: the test runs in tmp_path).
CONFIG = {
    "seed": 0,
    "data": {"private": {"kind": "digits"}, "public": None, "image_size": 8, "channels": 1,
             "fractions": {"public": 0.25, "private": 0.55, "test": 0.2}, "shard_size": 200},
    "model": {"block_out_channels": [16, 32], "norm_num_groups": 8, "attention_levels": [1]},
    "diffusion": {"num_train_timesteps": 100},
    "pretrain": {"steps": 2, "batch_size": 8, "checkpoint_every": 1, "log_every": 1},
    "finetune": {"timesteps": {"kind": "uniform"}, "steps": 2, "batch_size": 24, "physical_batch_size": 12,
                 "aug_multiplicity": 2, "accountant": "rdp", "noise_seed": 7,
                 "checkpoint_every": 1, "log_every": 1},
    "privacy": {"ledger_dir": LEDGER, "dataset_budget_epsilon": 100.0},
    "sample": {"num_samples": 20, "num_shards": 2, "batch_size": 10,
               "num_inference_steps": 2},
    "fid": {"extractors": ["domain-cnn"], "batch_size": 64, "max_features": 100,
            "kid_subsets": 2, "kid_subset_size": 10,
            "domain_cnn": {"steps": 2, "batch_size": 16, "width": 8, "feature_dim": 16}},
    "classify": {"classifier": {"depth": 10, "widen": 1, "epochs": 1, "batch_size": 16},
                 "sizes": [10, 20], "real_baseline": False},
    "tracking": {"enabled": False},
}


# --------------------------------------------------------------------------- malicious pickles


class Exploit:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


def evil_torch_file(path: Path, marker: str = MARKER) -> Path:
    """A `torch.save` pickle of a 'state dict' whose value runs code when loaded."""
    torch.save({"conv.weight": Exploit(marker), "bias": torch.zeros(2)}, path)
    return path


def test_the_exploit_pickles_really_run_code(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the payloads used below do create the marker when unpickled
    unsafely, so `marker was not created` in the table means something."""
    monkeypatch.chdir(tmp_path)
    torch.load(evil_torch_file(tmp_path / "evil.pt"), weights_only=False)
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    pickle.loads(py2_pickle({b"data": Exploit(MARKER)}))
    assert (tmp_path / MARKER).exists()


# --------------------------------------------------------------------------- valid inputs


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.round(d.images * 255 / 16).astype(np.uint8)[..., None], d.target.astype(np.int64)


@pytest.fixture(scope="module")
def valid_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid inputs of every stage, made once (copied into each test's folder):
    public/private/test/synthetic shard folders of digits, an untrained tiny
    model (a stage refusing bad input never gets to use its weights), and a
    privacy ledger on the private split holding one earlier completed run."""
    images, labels = digits_uint8()
    root = tmp_path_factory.mktemp("valid") / "inputs"
    for name, lo, hi, shard in [("public", 0, 200, 100), ("private", 1000, 1000 + NUM_PRIVATE, 200),
                                ("test", 300, 400, 100), ("synthetic", 500, 560, 30)]:
        write_dataset(root / name, images[lo:hi], labels[lo:hi], CLASSES,
                      source=f"sklearn-digits {name}", shard_size=shard)
    spec = UNetSpec(image_size=8, channels=1, num_classes=10,
                    model=ModelConfig(block_out_channels=(16, 32), norm_num_groups=8,
                                      attention_levels=(1,)))
    torch.manual_seed(0)
    net = build_unet(spec)
    save_model(root / "model", spec, net, net, extra={"classes": list(CLASSES)})
    ledger = PrivacyLedger(root / "ledger", dataset_key(read_dataset(root / "private")[0]))
    ledger.reserve("earlier-run", [(0.8, 0.1, 100)], delta=1e-5, accountant="rdp",
                   target_epsilon=12.5, budget_epsilon=100.0,
                   budget_delta=1e-5)  # epsilon 12.36 spent
    ledger.complete("earlier-run", 100)
    # this run's point for `sweep`: a DP model (the weights above, its privacy.json and
    # params.json) and the public-only, classify and fid metrics
    shutil.copytree(root / "model", root / "dp_model")
    (root / "dp_model" / "privacy.json").write_text(json.dumps({"epsilon": 9.9}))
    (root / "dp_model" / "params.json").write_text(json.dumps({"finetune": {"epsilon": 10}}))
    for name, metrics in (("baseline", {"public_only_real_test_accuracy": 0.3,
                                        "public_only_fd_digits_cnn": 9.0}),
                          ("classify", {"real_test_accuracy": 0.6}),
                          ("fid", {"fd_digits_cnn": 4.0})):
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(json.dumps(metrics))
    return root


# --------------------------------------------------------------------------- the context


@dataclass
class Ctx:
    """What a row's builder gets: the test's folder (the working directory), a
    copy of the valid inputs in `inputs/`, and the S3 bucket for S3 rows."""

    tmp: Path
    s3: Any = None

    @property
    def inputs(self) -> Path:
        return self.tmp / "inputs"

    def out(self, stage: str) -> Path:
        return self.tmp / "artifacts" / stage

    def argv(self, stage: str, *args: str, sets: tuple[str, ...] = ()) -> list[str]:
        """`dpsynth <stage> -q --config config.yaml [--set ...] <args> --out artifacts/<stage>`."""
        overrides = [a for s in sets for a in ("--set", s)]
        return [stage, "-q", "--config", "config.yaml", *overrides, *args,
                "--out", str(Path("artifacts") / stage)]

    def bucket(self) -> str:
        return self.s3.bucket


def private_source(kind: str, path: str | Path, **extra: Any) -> str:
    """A `--set data.private=...` override (YAML flow mapping)."""
    items = ", ".join(f"{k}: {json.dumps(v)}" for k, v in
                      {"kind": kind, "path": str(path), **extra}.items())
    return f"data.private={{{items}}}"


def prepare_with(kind: str, rel: str, *sets: str) -> Callable[[Ctx], list[str]]:
    """argv of `prepare` reading the private pool from `inputs/<rel>`."""
    return lambda c: c.argv("prepare", sets=(private_source(kind, f"inputs/{rel}"), *sets))


def save_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def good_npz(n: int = 40, classes: tuple[str, ...] = ("a", "b")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"images": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
            "labels": np.arange(n) % len(classes), "classes": np.array(classes)}


def npz_with(**changes: Any) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        save_npz(c.inputs / "raw.npz", **{**good_npz(), **changes})

    return build


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_shard(folder: Path, images: np.ndarray | None = None,
                  labels: np.ndarray | None = None) -> None:
    """Replace shard 0 with other content and fix its manifest hash: the hash
    matches, so only the content checks can catch it."""
    with np.load(folder / "shard-00000.npz") as z:
        old_images, old_labels = z["images"], z["labels"]
    data = encode_shard(old_images if images is None else images,
                        old_labels if labels is None else labels)
    (folder / "shard-00000.npz").write_bytes(data)
    raw = json.loads((folder / MANIFEST).read_text())
    raw["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(raw))


def empty_split(folder: Path) -> None:
    shutil.rmtree(folder)
    write_dataset(folder, np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int64), CLASSES,
                  source="empty")


# --------------------------------------------------------------------------- raw builders


def cifar(change: Callable[[dict[str, bytes]], None] | None = None,
          after: Callable[[Path], None] | None = None) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        members = cifar_members(per_batch=12)  # 6 per class: enough for 3 stratified splits
        if change:
            change(members)
        c.inputs.mkdir(exist_ok=True)
        path = write_tarball(c.inputs / "cifar-10-python.tar.gz", members)
        if after:
            after(path)

    return build


def cifar_labels_out_of_range(members: dict[str, bytes]) -> None:
    data = np.zeros((2, 3072), np.uint8)
    members["data_batch_3"] = py2_pickle({b"labels": [3, 10], b"data": data})


def cifar_with_code(members: dict[str, bytes]) -> None:
    members["data_batch_2"] = py2_pickle({b"labels": [0, 1], b"data": Exploit(MARKER)})


def gzip_garbage(path: Path) -> None:
    path.write_bytes(gzip.compress(b"this is not a tar archive" * 100))


def imagefolder(change: Callable[[Path], None]) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        root = write_imagefolder(c.inputs / "folder", per_class=4, size=(8, 8))
        change(root)

    return build


def camelyon(change: Callable[[Path], None] | None = None,
             rows: Callable[[list[dict[str, int]]], None] | None = None
             ) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        table = camelyon_rows()
        if rows:
            rows(table)
        root = write_camelyon17(c.inputs / "camelyon17", rows=table)
        if change:
            change(root)

    return build


def first_patch(root: Path) -> Path:
    return sorted((root / "patches").rglob("*.png"))[0]


def mixed_sizes(root: Path) -> None:
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "dog" / "big.png")


# --------------------------------------------------------------------------- stage builders


def pretrain_argv(public: str = "inputs/public", *sets: str) -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("pretrain", "--public", public, sets=sets)


def finetune_argv(*sets: str, model: str = "inputs/model", private: str = "inputs/private",
                  public: str = "inputs/public") -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("finetune", "--model", model, "--private", private,
                            "--public", public, sets=sets)


def sample_argv(*args: str, model: str = "inputs/model",
                sets: tuple[str, ...] = ()) -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("sample", "--model", model, *args, sets=sets)


def fid_argv(*sets: str, synthetic: str = "inputs/synthetic",
             public: str = "inputs/public") -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("fid", "--synthetic", synthetic, "--test", "inputs/test",
                            "--public", public, sets=sets)


def marked_private(c: Ctx) -> None:
    """Give inputs/private the manifest that `prepare` gives the private split."""
    path = c.inputs / "private" / MANIFEST
    raw = json.loads(path.read_text())
    raw["source"] = carved_source("sklearn-digits", "private", 0)
    raw["role"] = "private"
    path.write_text(json.dumps(raw))


def schema_1_ledger(c: Ctx) -> None:
    """The ledger of an older dpsynth instead: keyed by the private manifest's hash."""
    for ledger in (c.inputs / "ledger").glob("*.json"):
        raw = json.loads(ledger.read_text())
        ledger.unlink()
    raw["schema"] = 1
    raw["dataset"] = read_manifest(c.inputs / "private").content_hash
    del raw["budget_delta"]
    for entry in raw["entries"]:
        del entry["target_epsilon"]
    (c.inputs / "ledger" / f"{raw['dataset']}.json").write_text(json.dumps(raw))


def sweep_argv(*sets: str, model: str = "inputs/model", dp_model: str = "inputs/dp_model",
               baseline: str = "inputs/baseline") -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("sweep", "--model", model, "--dp-model", dp_model,
                            "--private", "inputs/private", "--public", "inputs/public",
                            "--test", "inputs/test", "--baseline", baseline,
                            "--classify", "inputs/classify", "--fid", "inputs/fid", sets=sets)


def classify_argv(*sets: str, synthetic: str = "inputs/synthetic") -> Callable[[Ctx], list[str]]:
    return lambda c: c.argv("classify", "--synthetic", synthetic, "--test", "inputs/test",
                            sets=sets)


def evil_model_weights(c: Ctx) -> None:
    for name in (WEIGHTS, EMA_WEIGHTS):
        evil_torch_file(c.inputs / "model" / name)


def pickle_only_model(c: Ctx) -> None:
    for name in (WEIGHTS, EMA_WEIGHTS):
        (c.inputs / "model" / name).unlink()
    evil_torch_file(c.inputs / "model" / "pytorch_model.bin")


def evil_checkpoint(stage: str) -> Callable[[Ctx], None]:
    """A work folder whose latest checkpoint's files are code-running pickles."""

    def build(c: Ctx) -> None:
        ckpt = c.tmp / "artifacts" / ".work" / stage / "ckpt-00000001"
        ckpt.mkdir(parents=True)
        for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
            evil_torch_file(ckpt / name)
        (ckpt / "state.json").write_text(json.dumps({"step": 1, "param_groups": [],
                                                     "meta": {}}))
        (ckpt.parent / "latest.json").write_text(json.dumps({"checkpoint": ckpt.name,
                                                             "step": 1}))

    return build


def nothing(c: Ctx) -> None:
    pass


def write_file(rel: str, text: str) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        (c.tmp / rel).write_text(text)

    return build


def both(*builders: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def build(c: Ctx) -> None:
        for b in builders:
            b(c)

    return build


# --------------------------------------------------------------------------- the table
# Each row: (how to make the bad input, the argv, expected message parts). In argv
# and message parts "{bucket}" stands for the S3 rows' bucket; all parts must appear.
# Rows that need the moto S3 server have "s3" in their id.

ROWS = [
    # ---- prepare: CIFAR-10 tarball
    pytest.param(cifar(after=truncate), prepare_with("cifar10", "cifar-10-python.tar.gz"),
                 ["data.private (cifar10)", "inputs/cifar-10-python.tar.gz",
                  "corrupt or truncated archive", "re-download"],
                 id="cifar10-truncated-tarball"),
    pytest.param(cifar(after=gzip_garbage), prepare_with("cifar10", "cifar-10-python.tar.gz"),
                 ["inputs/cifar-10-python.tar.gz", "corrupt or truncated", "re-download"],
                 id="cifar10-not-a-tar-archive"),
    pytest.param(cifar(lambda m: m.pop("test_batch")),
                 prepare_with("cifar10", "cifar-10-python.tar.gz"),
                 ["inputs/cifar-10-python.tar.gz", "cifar-10-batches-py/test_batch",
                  "Re-download"], id="cifar10-member-missing"),
    pytest.param(cifar(cifar_labels_out_of_range),
                 prepare_with("cifar10", "cifar-10-python.tar.gz"),
                 ["data_batch_3", "field 'labels'", "labels must be in [0, 10), found [3, 10]",
                  "fix the labels"], id="cifar10-labels-out-of-range"),
    pytest.param(cifar(cifar_with_code), prepare_with("cifar10", "cifar-10-python.tar.gz"),
                 ["data_batch_2", "refusing to load it", "Re-download"],
                 id="cifar10-pickle-with-code"),
    # ---- prepare: npz
    pytest.param(both(npz_with(), lambda c: truncate(c.inputs / "raw.npz")),
                 prepare_with("npz", "raw.npz"),
                 ["data.private (npz)", "inputs/raw.npz", "not a readable .npz",
                  "re-save it with np.savez"], id="npz-truncated"),
    pytest.param(npz_with(images=np.random.default_rng(0).random((40, 8, 8, 1))),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'images'", "dtype float64, expected uint8",
                  "convert it"], id="npz-wrong-dtype"),
    pytest.param(npz_with(images=np.full((40, 8, 8, 1), np.nan, np.float32)),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'images'", "NaN", "uint8 0..255"],
                 id="npz-nan-pixels"),
    pytest.param(npz_with(images=np.full((40, 8, 8, 1), np.inf, np.float32)),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'images'", "inf", "uint8 0..255"],
                 id="npz-inf-pixels"),
    pytest.param(npz_with(images=np.zeros((40, 8, 8, 4), np.uint8)),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'images'", "shape (40, 8, 8, 4)",
                  "C in {1, 3}"], id="npz-four-channels"),
    pytest.param(npz_with(images=np.zeros((40, 64), np.uint8)),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'images'", "shape (40, 64)", "expected (N, H, W, C)"],
                 id="npz-wrong-shape"),
    pytest.param(npz_with(labels=np.arange(40) % 3), prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz: field 'labels'", "labels must be in [0, 2), found [0, 2]",
                  "fix the labels or the class list"], id="npz-labels-out-of-range"),
    pytest.param(npz_with(labels=np.arange(39) % 2), prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz", "40 images but 39 labels", "one to one"],
                 id="npz-count-mismatch"),
    pytest.param(npz_with(labels=np.array([Exploit(MARKER)] * 40, dtype=object)),
                 prepare_with("npz", "raw.npz"),
                 ["inputs/raw.npz", "without pickled objects", "plain arrays"],
                 id="npz-pickled-object-with-code"),
    pytest.param(nothing, prepare_with("npz", "missing.npz"),
                 ["data.private (npz)", "inputs/missing.npz: not found",
                  "check the npz source's path"], id="npz-file-missing"),
    pytest.param(npz_with(images=np.zeros((0, 8, 8, 1), np.uint8),
                          labels=np.zeros(0, np.int64)),
                 prepare_with("npz", "raw.npz"),
                 ["data.private", "inputs/raw.npz", "no images"],
                 id="npz-empty-source"),
    pytest.param(npz_with(), prepare_with(
        "npz", "raw.npz", "data.fractions={public: 0.5, private: 0.0, test: 0.5}"),
                 ["the private split is empty", "data.fractions.private=0.0",
                  "set data.fractions.private > 0"], id="empty-private-split"),
    pytest.param(npz_with(classes=np.array(["a", "b", "c"])), prepare_with("npz", "raw.npz"),
                 ["class 'c' has no examples in the private split", "inputs/raw.npz",
                  "add examples of it"], id="class-absent-from-private"),
    # ---- prepare: image folders
    pytest.param(imagefolder(lambda r: (r / "cat" / "c1.png").write_bytes(b"\x89PNG broken")),
                 prepare_with("imagefolder", "folder"),
                 ["data.private (imagefolder)", "inputs/folder/cat/c1.png",
                  "not a readable PNG/JPEG", "re-export or remove it"],
                 id="imagefolder-corrupt-image"),
    pytest.param(imagefolder(mixed_sizes), prepare_with("imagefolder", "folder"),
                 ["inputs/folder/dog/big.png", "8x9", "resize them first"],
                 id="imagefolder-mixed-sizes"),
    pytest.param(imagefolder(lambda r: (r / "empty").mkdir()),
                 prepare_with("imagefolder", "folder"),
                 ["inputs/folder/empty", "no .png/.jpg/.jpeg images", "remove the folder"],
                 id="imagefolder-empty-class"),
    # ---- prepare: camelyon17 (WILDS layout)
    pytest.param(camelyon(lambda r: (r / "metadata.csv").unlink()),
                 prepare_with("camelyon17", "camelyon17"),
                 ["inputs/camelyon17/metadata.csv: not found", "WILDS folder"],
                 id="camelyon17-no-metadata"),
    pytest.param(camelyon(lambda r: first_patch(r).unlink()),
                 prepare_with("camelyon17", "camelyon17"),
                 ["inputs/camelyon17/patches/", "is missing", "re-extract"],
                 id="camelyon17-missing-patch"),
    pytest.param(camelyon(lambda r: truncate(first_patch(r), 0.3)),
                 prepare_with("camelyon17", "camelyon17"),
                 ["inputs/camelyon17/patches/", "not a readable PNG/JPEG", "re-export"],
                 id="camelyon17-truncated-patch"),
    pytest.param(camelyon(rows=lambda t: t[3].update(tumor=2)),
                 prepare_with("camelyon17", "camelyon17"),
                 ["inputs/camelyon17/metadata.csv line 5", "'tumor' is 2, expected 0 or 1",
                  "fix metadata.csv"], id="camelyon17-label-out-of-range"),
    # ---- prepare: a public source (downsampled ImageNet npz batches)
    pytest.param(lambda c: truncate(write_imagenet32(c.inputs / "imagenet32")
                                    / "train_data_batch_2.npz"),
                 lambda c: c.argv("prepare", sets=(
                     "data.public={kind: imagenet32, path: inputs/imagenet32}",)),
                 ["data.public (imagenet32)", "inputs/imagenet32/train_data_batch_2.npz",
                  "corrupt, truncated", "re-download"], id="imagenet32-truncated-batch"),
    # ---- config
    pytest.param(nothing, lambda c: c.argv("prepare", sets=("data.channels=2",)),
                 ["data.channels=2", "must be one of [1, 3]"], id="config-wrong-channels"),
    pytest.param(write_file("config.yaml", "seed: 0\nsede: 1\ntracking: {enabled: false}\n"),
                 lambda c: c.argv("prepare"),
                 ["unknown key(s) ['sede']", "known keys"], id="config-unknown-top-level-key"),
    pytest.param(nothing, lambda c: c.argv("pretrain", "--public", "inputs/public",
                                           sets=("pretrain.learning_rate=0.1",)),
                 ["pretrain: unknown key(s) ['learning_rate']", "'lr'"],
                 id="config-unknown-key-set"),
    pytest.param(write_file("config.yaml", "seed: [0\n"), lambda c: c.argv("prepare"),
                 ["config.yaml", "not valid YAML"], id="config-invalid-yaml"),
    pytest.param(nothing, pretrain_argv("inputs/public", "pretrain.steps=0"),
                 ["pretrain.steps=0: must be >= 1"], id="pretrain-steps-zero"),
    pytest.param(nothing, pretrain_argv("inputs/public", "pretrain.steps=many"),
                 ["pretrain.steps='many': must be an integer"], id="config-wrong-type"),
    # ---- S3 sources
    pytest.param(nothing, lambda c: c.argv("prepare", sets=(
        private_source("npz", f"s3://{c.bucket()}/raw/missing.npz"),)),
                 ["s3://{bucket}/raw/missing.npz", "no object or prefix", "check the path"],
                 id="s3-missing-key"),
    pytest.param(nothing, lambda c: c.argv("prepare", sets=(
        private_source("npz", "s3://no-such-bucket-dpsynth/raw.npz"),)),
                 ["s3://no-such-bucket-dpsynth/raw.npz", "does not exist",
                  "check the bucket name"], id="s3-missing-bucket"),
    pytest.param(nothing, lambda c: c.argv("pretrain", "--public",
                                           f"s3://{c.bucket()}/prepare/public"),
                 ["s3://{bucket}/prepare/public", "nothing there", "run the stage"],
                 id="s3-missing-input-folder"),
    # ---- pretrain
    pytest.param(lambda c: flip_byte(c.inputs / "public" / "shard-00001.npz"),
                 pretrain_argv(), ["inputs/public/shard-00001.npz", "sha256 does not match",
                                   "re-run the stage"], id="pretrain-tampered-shard"),
    pytest.param(lambda c: truncate(c.inputs / "public" / "shard-00000.npz"),
                 pretrain_argv(), ["inputs/public/shard-00000.npz", "tampered or truncated",
                                   "re-run the stage"], id="pretrain-truncated-shard"),
    pytest.param(lambda c: (c.inputs / "public" / MANIFEST).write_text("{not json"),
                 pretrain_argv(), ["inputs/public/manifest.json", "not a valid manifest",
                                   "re-run the stage"], id="pretrain-corrupt-manifest"),
    pytest.param(nothing, pretrain_argv("inputs/nowhere"),
                 ["inputs/nowhere/manifest.json", "no manifest",
                  "artifacts/prepare"], id="pretrain-missing-input"),
    pytest.param(lambda c: empty_split(c.inputs / "public"), pretrain_argv(),
                 ["inputs/public", "no images", "dpsynth prepare"],
                 id="pretrain-empty-public-split"),
    pytest.param(lambda c: rewrite_shard(c.inputs / "public",
                                         images=np.full((100, 8, 8, 1), np.nan, np.float32)),
                 pretrain_argv(), ["inputs/public/shard-00000.npz", "dtype float32",
                                   "expected uint8", "re-run the stage"],
                 id="pretrain-nan-pixels-in-shard"),
    pytest.param(lambda c: rewrite_shard(c.inputs / "public", labels=np.full(100, 12)),
                 pretrain_argv(), ["inputs/public/shard-00000.npz",
                                   "labels must be in [0, 10)", "re-run the stage"],
                 id="pretrain-labels-out-of-range-in-shard"),
    pytest.param(evil_checkpoint("pretrain"), pretrain_argv(),
                 ["artifacts/.work/pretrain", "checkpoint is unreadable", "delete the folder"],
                 id="pretrain-checkpoint-pickle-with-code"),
    # ---- finetune: settings
    pytest.param(nothing, finetune_argv("finetune.epsilon=0"),
                 ["finetune.epsilon=0.0: must be > 0"], id="finetune-epsilon-zero"),
    pytest.param(nothing, finetune_argv("finetune.epsilon=-1"),
                 ["finetune.epsilon=-1.0: must be > 0"], id="finetune-epsilon-negative"),
    pytest.param(nothing, finetune_argv("finetune.delta=1"),
                 ["finetune.delta=1.0: must be in (0, 1)"], id="finetune-delta-one"),
    pytest.param(nothing, finetune_argv("finetune.delta=0.01"),
                 ["finetune.delta=0.01", "well below 1/N", "lower finetune.delta"],
                 id="finetune-delta-above-one-over-n"),
    pytest.param(nothing, finetune_argv("finetune.aug_multiplicity=0"),
                 ["finetune.aug_multiplicity=0: must be >= 1"], id="finetune-K-zero"),
    pytest.param(nothing, finetune_argv("finetune.batch_size=5000"),
                 ["finetune.batch_size=5000", "larger than the private split",
                  "lower finetune.batch_size"], id="finetune-batch-larger-than-data"),
    pytest.param(nothing, finetune_argv("privacy.dataset_budget_epsilon=13"),
                 ["budget", "privacy.dataset_budget_epsilon", "(ε ≤ 13, δ = 1e-05)",
                  "earlier-run (completed, 100/100 steps, target ε = 12.5)"],
                 id="finetune-over-dataset-budget"),
    pytest.param(nothing, finetune_argv("finetune.delta=2e-5"),
                 ["finetune.delta=2e-05", "privacy.dataset_budget_delta=1e-05",
                  "Lower finetune.delta"], id="finetune-delta-above-budget-delta"),
    pytest.param(nothing, finetune_argv("privacy.dataset_budget_delta=1e-4"),
                 ["privacy.dataset_budget_delta=0.0001", "never changes",
                  "Set privacy.dataset_budget_delta=1e-05"], id="finetune-budget-delta-changed"),
    pytest.param(schema_1_ledger, finetune_argv(),
                 ["inputs/ledger/", "a privacy ledger of schema 1", "still count",
                  "Convert it by hand"], id="finetune-schema-1-ledger"),
    # ---- --public: never the private split (pretrain, finetune, fid)
    pytest.param(marked_private, pretrain_argv("inputs/private"),
                 ["public_dir='inputs/private'", "is the PRIVATE split",
                  "artifacts/prepare/public"], id="pretrain-private-split-as-public"),
    pytest.param(marked_private, finetune_argv(public="inputs/private"),
                 ["public_dir='inputs/private'", "is the PRIVATE split",
                  "artifacts/prepare/public"], id="finetune-private-split-as-public"),
    pytest.param(nothing, finetune_argv(public="inputs/private"),
                 ["public_dir='inputs/private'", "holds the same images as private_dir",
                  "artifacts/prepare/public"], id="finetune-private-images-as-public"),
    pytest.param(marked_private, fid_argv(public="inputs/private"),
                 ["public_dir='inputs/private'", "is the PRIVATE split",
                  "artifacts/prepare/public"], id="fid-private-split-as-public"),
    # ---- finetune: model
    pytest.param(nothing, finetune_argv(model="inputs/no-model"),
                 ["inputs/no-model/config.json", "no model config", "dpsynth pretrain"],
                 id="finetune-missing-model"),
    pytest.param(lambda c: [(c.inputs / "model" / n).unlink() for n in (WEIGHTS, EMA_WEIGHTS)],
                 finetune_argv(), ["inputs/model: no model.safetensors", "re-run"],
                 id="finetune-missing-weights"),
    pytest.param(evil_model_weights, finetune_argv(),
                 ["inputs/model/" + EMA_WEIGHTS, "not a safetensors file but a pickle",
                  "never unpickled", "re-run `dpsynth pretrain`"],
                 id="finetune-weights-pickle-with-code"),
    pytest.param(pickle_only_model, finetune_argv(),
                 ["inputs/model: no model.safetensors", "pytorch_model.bin",
                  "never unpickled", "re-run `dpsynth pretrain`"],
                 id="finetune-pickle-instead-of-safetensors"),
    pytest.param(lambda c: (c.inputs / "model" / "config.json").write_text("{"),
                 finetune_argv(), ["inputs/model/config.json", "not a valid model config",
                                   "re-run"], id="finetune-corrupt-model-config"),
    pytest.param(evil_checkpoint("finetune"), finetune_argv(),
                 ["artifacts/.work/finetune", "checkpoint is unreadable", "delete the folder"],
                 id="finetune-checkpoint-pickle-with-code"),
    # ---- finetune: data
    pytest.param(lambda c: flip_byte(c.inputs / "private" / "shard-00001.npz"),
                 finetune_argv(), ["inputs/private/shard-00001.npz", "sha256 does not match",
                                   "re-run the stage"], id="finetune-tampered-private-shard"),
    pytest.param(lambda c: empty_split(c.inputs / "private"), finetune_argv(),
                 ["inputs/private", "no images", "dpsynth prepare"],
                 id="finetune-empty-private-split"),
    pytest.param(lambda c: rewrite_shard(c.inputs / "private", labels=np.full(200, -1)),
                 finetune_argv(), ["inputs/private/shard-00000.npz", "labels must be in [0, 10)",
                                   "re-run the stage"],
                 id="finetune-labels-out-of-range-in-shard"),
    pytest.param(lambda c: rewrite_shard(c.inputs / "private",
                                         images=np.zeros((200, 8, 8, 3), np.uint8)),
                 finetune_argv(), ["inputs/private/shard-00000.npz", "(8, 8, 3)",
                                   "manifest says (8, 8, 1)"],
                 id="finetune-shard-shape-differs-from-manifest"),
    pytest.param(lambda c: (shutil.rmtree(c.inputs / "private"), write_dataset(
        c.inputs / "private", np.zeros((50, 8, 8, 3), np.uint8), np.arange(50) % 10, CLASSES,
        source="rgb")), finetune_argv(),
                 ["inputs/private", "[8, 8, 3]", "the model expects [8, 8, 1]",
                  "data.channels"], id="finetune-wrong-channels"),
    pytest.param(lambda c: (shutil.rmtree(c.inputs / "private"), write_dataset(
        c.inputs / "private", np.zeros((50, 8, 8, 1), np.uint8), np.arange(50) % 2, ("x", "y"),
        source="other")), finetune_argv(),
                 ["inputs/private", "classes ['x', 'y'] differ", "same label set"],
                 id="finetune-other-classes"),
    pytest.param(lambda c: flip_byte(c.inputs / "public" / "shard-00000.npz"),
                 finetune_argv(), ["inputs/public/shard-00000.npz", "sha256 does not match"],
                 id="finetune-tampered-public-shard"),
    pytest.param(lambda c: (shutil.rmtree(c.inputs / "public"), write_dataset(
        c.inputs / "public", np.zeros((50, 16, 16, 1), np.uint8), np.arange(50) % 10, CLASSES,
        source="big")), finetune_argv(),
                 ["inputs/public", "[16, 16, 1]", "the model expects [8, 8, 1]"],
                 id="finetune-public-wrong-shape"),
    pytest.param(nothing, finetune_argv(model="s3://{bucket}/pretrain"),
                 ["s3://{bucket}/pretrain", "nothing there"],
                 id="finetune-s3-model-missing"),
    # ---- sample
    pytest.param(nothing, sample_argv(model="inputs/no-model"),
                 ["inputs/no-model", "no model weights", "dpsynth pretrain"],
                 id="sample-missing-model"),
    pytest.param(evil_model_weights, sample_argv(),
                 ["inputs/model/" + EMA_WEIGHTS, "not a safetensors file but a pickle",
                  "never unpickled", "re-run `dpsynth pretrain`"],
                 id="sample-weights-pickle-with-code"),
    pytest.param(nothing, sample_argv("--shard-index", "7"),
                 ["--shard-index 7", "sample.num_shards=2"], id="sample-shard-index-too-big"),
    pytest.param(nothing, sample_argv(sets=("sample.num_shards=50",)),
                 ["sample.num_shards=50", "must be <= sample.num_samples=20"],
                 id="sample-more-shards-than-samples"),
    # ---- fid
    pytest.param(lambda c: evil_torch_file(c.inputs / "inception.pth"), fid_argv(
        "fid.extractors=[inception-v3-compat]", "fid.inception_weights=inputs/inception.pth"),
                 ["inputs/inception.pth", "not a plain weights file, refused",
                  "weights-inception-2015-12-05"], id="fid-inception-pickle-with-code"),
    pytest.param(nothing, fid_argv("fid.extractors=[inception-v3-compat]",
                                   "fid.inception_weights=inputs/none.pth"),
                 ["fid.inception_weights='inputs/none.pth'", "not found",
                  "weights-inception-2015-12-05"], id="fid-inception-weights-missing"),
    pytest.param(nothing, lambda c: fid_argv(
        "fid.extractors=[inception-v3-compat]",
        f"fid.inception_weights=s3://{c.bucket()}/weights/inception.pth")(c),
                 ["s3://{bucket}/weights/inception.pth", "cannot read it", "no such object"],
                 id="fid-inception-weights-s3-missing"),
    pytest.param(lambda c: flip_byte(c.inputs / "synthetic" / "shard-00001.npz"), fid_argv(),
                 ["inputs/synthetic/shard-00001.npz", "sha256 does not match",
                  "re-run the stage"], id="fid-tampered-synthetic-shard"),
    pytest.param(lambda c: (shutil.rmtree(c.inputs / "synthetic"), write_dataset(
        c.inputs / "synthetic", np.zeros((20, 8, 8, 3), np.uint8), np.arange(20) % 10, CLASSES,
        source="rgb")), fid_argv(),
                 ["synthetic_dir='inputs/synthetic'", "(8, 8, 3)", "data.channels"],
                 id="fid-wrong-channels"),
    # ---- classify
    pytest.param(lambda c: flip_byte(c.inputs / "synthetic" / "shard-00000.npz"),
                 classify_argv(), ["inputs/synthetic/shard-00000.npz", "sha256 does not match",
                                   "re-run the stage"], id="classify-tampered-synthetic-shard"),
    pytest.param(lambda c: rewrite_shard(c.inputs / "synthetic", labels=np.full(30, 10)),
                 classify_argv(), ["inputs/synthetic/shard-00000.npz",
                                   "labels must be in [0, 10)"],
                 id="classify-labels-out-of-range-in-shard"),
    pytest.param(nothing, classify_argv("classify.sizes=[10, 100]"),
                 ["inputs/synthetic", "classify.sizes=[10, 100]", "sample more"],
                 id="classify-sizes-larger-than-synthetic-set"),
    # ---- sweep: refused before the ledger (a refusal reserves nothing)
    pytest.param(nothing, sweep_argv("sweep.epsilons=[20, 60]",
                                     "privacy.dataset_budget_epsilon=50"),
                 ["This sweep (2 runs at target ε = 20, 60", "needs up to ε = 80",
                  "(ε ≤ 50, δ = 1e-05)", "nothing was reserved or trained"],
                 id="sweep-over-dataset-budget"),
    pytest.param(nothing, sweep_argv("sweep.epsilons=[5, 2]"),
                 ["sweep.epsilons=[5.0, 2.0]", "must be strictly increasing"],
                 id="sweep-epsilons-not-increasing"),
    pytest.param(nothing, sweep_argv(dp_model="inputs/model"),
                 ["dp_model_dir='inputs/model'", "no privacy.json",
                  "pass the output of `dpsynth finetune`"], id="sweep-dp-model-not-dp"),
    pytest.param(nothing, sweep_argv(model="inputs/dp_model"),
                 ["model_dir='inputs/dp_model'", "DP fine-tuned model", "artifacts/pretrain"],
                 id="sweep-starts-from-a-dp-model"),
    pytest.param(nothing, sweep_argv(baseline="inputs/public"),
                 ["baseline_dir='inputs/public'", "no readable metrics.json",
                  "artifacts/baseline"], id="sweep-baseline-not-given"),
]


# Controls: the same builders and argv with nothing broken succeed, so each row
# above fails because of its one bad input.
VALID = [
    pytest.param(cifar(), prepare_with("cifar10", "cifar-10-python.tar.gz"), id="cifar10"),
    pytest.param(npz_with(), prepare_with("npz", "raw.npz"), id="npz"),
    pytest.param(imagefolder(lambda root: None), prepare_with("imagefolder", "folder"),
                 id="imagefolder"),
    pytest.param(camelyon(), prepare_with("camelyon17", "camelyon17"), id="camelyon17"),
    pytest.param(lambda c: write_imagenet32(c.inputs / "imagenet32"), lambda c: c.argv(
        "prepare", sets=("data.public={kind: imagenet32, path: inputs/imagenet32}",)),
                 id="imagenet32"),
    pytest.param(nothing, pretrain_argv(), id="pretrain"),
    pytest.param(nothing, finetune_argv(), id="finetune"),
    pytest.param(nothing, sample_argv(), id="sample"),
    pytest.param(nothing, fid_argv(), id="fid"),
    pytest.param(nothing, classify_argv(), id="classify"),
    pytest.param(nothing, sweep_argv("sweep.epsilons=[10]"), id="sweep"),
]


# --------------------------------------------------------------------------- the test


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too): path -> content hash."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            tree[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                tree[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return tree


@pytest.fixture
def ctx(request: pytest.FixtureRequest, tmp_path: Path, valid_inputs: Path,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    """The test's folder as the working directory, with the valid inputs, the
    config and an `artifacts/` folder; the S3 bucket for rows marked `s3`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the CLI's -q sets it; restored afterwards
    shutil.copytree(valid_inputs, tmp_path / "inputs")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "artifacts").mkdir()
    # the rows that read from S3 say so in their id
    callspec = getattr(request.node, "callspec", None)
    s3 = request.getfixturevalue("s3") if callspec and "s3" in callspec.id else None
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Ctx(tmp_path, s3)
    finally:
        torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("build, argv, expected", ROWS)
def test_bad_input_is_refused_clearly_and_writes_nothing(
        build: Callable[[Ctx], Any], argv: Callable[[Ctx], list[str]], expected: list[str],
        ctx: Ctx, capsys: pytest.CaptureFixture) -> None:
    build(ctx)
    bucket = ctx.bucket() if ctx.s3 else "(no bucket)"
    args = [a.replace("{bucket}", bucket) for a in argv(ctx)]
    stage = args[0]
    before = snapshot(ctx.tmp)
    capsys.readouterr()

    code = cli.main(args)

    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"dpsynth {stage}: error: ") and "Traceback" not in err, err
    assert err.count("\n") == 1, err  # one line: the message alone
    for part in expected:
        part = part.replace("{bucket}", bucket)
        assert part in err, f"{part!r} not in {err!r}"
    # nothing written: no output, no work folder, no temporary folders, no ledger
    # entry, no marker from a pickle; every existing file unchanged
    assert not ctx.out(stage).exists()
    assert not (ctx.tmp / MARKER).exists(), "a malicious pickle ran"
    after = snapshot(ctx.tmp)
    assert after == before, {k: (before.get(k), after.get(k))
                             for k in set(before) | set(after) if before.get(k) != after.get(k)}


@pytest.mark.parametrize("build, argv", VALID)
def test_the_same_inputs_unbroken_pass(build: Callable[[Ctx], Any],
                                       argv: Callable[[Ctx], list[str]], ctx: Ctx,
                                       capsys: pytest.CaptureFixture) -> None:
    build(ctx)
    args = argv(ctx)
    assert cli.main(args) == 0, capsys.readouterr().err
    assert ctx.out(args[0]).is_dir()


def test_training_divergence_exits_1_with_the_step_and_the_kept_checkpoint(
        ctx: Ctx, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not bad input (exit 1, not 2), but the same promise: a clear one-line
    message and no published output; here the last good checkpoint stays."""
    from dpsynth.diffusion.loss import DenoisingLoss

    calls = {"n": 0}
    real = DenoisingLoss.per_example

    def nan_from_step_2(self: DenoisingLoss, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        return real(self, *args, **kwargs) * (float("nan") if calls["n"] >= 2 else 1.0)

    monkeypatch.setattr(DenoisingLoss, "per_example", nan_from_step_2)
    code = cli.main(ctx.argv("pretrain", "--public", "inputs/public"))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("dpsynth pretrain: error: pre-training diverged at step 2: the loss "
                          "on a public batch is nan") and err.count("\n") == 1, err
    assert "the last good checkpoint (step 1) is kept in artifacts/.work/pretrain" in err
    assert "Lower pretrain.lr" in err
    assert not ctx.out("pretrain").exists()
    assert sorted(p.name for p in (ctx.tmp / "artifacts" / ".work" / "pretrain").iterdir()) == [
        "ckpt-00000001", "latest.json"]
