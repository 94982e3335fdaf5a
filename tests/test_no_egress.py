"""Issue 7, no egress of private data: `dvc repro` of the smoke config on a private
split seeded with canaries, then a scan of everything the run left behind.

The private source is a class-per-folder PNG tree (`imagefolder`) of scikit-learn
digits whose every file name carries a unique `PRIVMARK-<hex>` marker and whose
every PNG carries a `PRIVMETA-<hex>` marker in a tEXt chunk; 50 of its images
are watermark canaries (a unique high-contrast pattern stamped on the border
ring). Public and test data are other digits, from their own `npz` sources, so
a legitimate copy of them is never taken for a leak.

Scanned: every file of the run's repo folder -- all DVC outputs (`dvc.lock`'s
outs of whatever stages dvc.yaml has), the MLflow store (sqlite db and artifact
folders), the privacy ledger, checkpoints, dvc.lock -- plus the captured logs of
`dvc repro`; excluded only: model weights, the private split itself and DVC's
cache (see `EXCLUDED`). Three findings must be absent: marker strings, exact
byte copies of a private image, and near-duplicates of one in any decoded image
(npz / npy / safetensors arrays, PNGs, PNGs embedded as data URIs, arrays
printed as text).
`test_scanner_finds_planted_copies` shows the scanner has power.

Issue 13, numeric egress (PRIVACY.md rule 8): outside the private boundary no
number may be determined by the private data. The values are gathered without
trusting the product: N counted from the images written here, q = B/N, σ and the
exact ε from `privacy.json` (inside the boundary), and the realised Poisson batch
sizes and per-example losses / gradient norms as recorded by wrappers that a
`sitecustomize.py` (first on the `dvc repro` subprocess's PYTHONPATH, see
`HOOK`) puts around `dpsynth.privacy`'s blocks in the `dpsynth finetune`
process. Every scanned file but `NUMERIC_BOUNDARY` is tokenised into numbers
(and the MLflow db's metrics / params / tags read as values too); see
`numeric_scan`. `test_numeric_scanner_finds_planted_values` shows it has power.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import yaml
from PIL import Image, PngImagePlugin

from dpsynth.config import load
from dpsynth.io.shards import read_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Marker prefixes: every private file name holds `PRIVMARK-<hex>`, every private
# PNG's tEXt chunk `PRIVMETA-<hex>`. Scanning for the prefixes (case-insensitive)
# finds every marker, whole or cut. Their JSON-, URL- and shell-escaped forms are
# the same bytes (letters, digits and '-' need no escaping), so plain bytes plus
# UTF-16 cover the encodings a log or a store would use.
MARKERS = (b"privmark", b"privmeta")
NUM_CANARIES = 50  # 5 per class
# Near-duplicate: candidate x (8x8, 0..255) of private image p when the mean
# absolute pixel difference MAD(x, p) < T(p).
# - Ordinary private digits, T = 3: float round trips and re-quantisation move a
#   pixel by 1-2 levels, while the two closest *distinct* images of all 1797
#   scikit-learn digits are MAD 4.0 apart; so under 3 it is the same image, not
#   another writer's similar digit (the fixture asserts no public / test image
#   is that close to a private one).
# - Canaries, T = 24: the watermark puts every canary >= ~50 away from every
#   natural digit (asserted: > 2 T from all public / test images), so anything
#   within 24 is closer to the canary than to any real digit -- a recognisable,
#   even noisy or partly degraded, copy of that one private image.
T_ORDINARY = 3.0
T_CANARY = 24.0
SIDE = 8  # smoke config: data.image_size=8, channels=1
# Model weights are not scanned: the DP model is released under (epsilon, delta)
# by design and its bytes are a function of the private data; memorisation by a
# model is the membership audit's question, not a byte scan's (PRIVACY.md).
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
EXCLUDED = (
    # The private split: prepare's output that *is* the private data. It stays on
    # the machine that runs the pipeline and is never logged or released.
    "artifacts/prepare/private",
    # DVC's content-addressed copies of the outs: byte-identical to the workspace
    # files scanned here, plus the private split's (excluded above).
    ".dvc/cache",
    "src",  # the copied source code: an input, not an output
    ".git",  # the empty repository DVC needs
)


@dataclass(frozen=True)
class PrivateSet:
    """The private images as written to the raw source.

    Attributes:
        images: uint8, shape (P, 8, 8).
        canary: bool, shape (P,): watermark canaries.
        names: the PNG file name of each image (for messages).
    """

    images: np.ndarray
    canary: np.ndarray
    names: tuple[str, ...]

    @property
    def thresholds(self) -> np.ndarray:
        return np.where(self.canary, T_CANARY, T_ORDINARY)


@dataclass(frozen=True)
class EgressRun:
    root: Path  # the temp repo after `dvc repro`
    logs: tuple[Path, ...]  # its captured stdout / stderr
    private: PrivateSet
    public_test: np.ndarray  # uint8 (N, 8, 8): the legitimate non-private images
    observed: Path  # what HOOK recorded, one JSON-lines file per process (outside `root`)


# --------------------------------------------------------------------------- data


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits as the `digits` source makes them: uint8 (N, 8, 8), labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def _ring() -> np.ndarray:
    ring = np.zeros((SIDE, SIDE), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring  # 28 border pixels, mostly dark in natural digits


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    np.savez(path, images=images[..., None], labels=labels,
             classes=np.array([str(c) for c in range(10)]))


def write_sources(folder: Path) -> tuple[PrivateSet, np.ndarray, dict[str, dict]]:
    """Public / test npz files and the private imagefolder tree with markers and canaries.

    Returns:
        The private set, the public + test images, and the `data` sources for params.yaml.
    """
    images, labels = _digits()
    rng = np.random.default_rng(2024)
    order = rng.permutation(len(images))
    # N = 1063: four digits, and no integer within 5 of it is written by the run (so a
    # token equal to N is no chance hit, test_private_numbers_are_distinctive)
    public, test, private = order[:430], order[430:734], order[734:]
    _write_npz(folder / "public.npz", images[public], labels[public])
    _write_npz(folder / "test.npz", images[test], labels[test])

    priv = images[private].copy()
    canary = np.zeros(len(priv), bool)
    for c in range(10):  # canaries: each its own pattern, half the ring at 255
        canary[np.flatnonzero(labels[private] == c)[:NUM_CANARIES // 10]] = True
    ring = _ring()
    for i in np.flatnonzero(canary):
        pattern = np.zeros(ring.sum(), np.uint8)
        pattern[rng.permutation(ring.sum())[:ring.sum() // 2]] = 255
        priv[i][ring] = pattern
    root = folder / "private-raw"  # a config value (public): no marker in it
    names = []
    for i, (img, label) in enumerate(zip(priv, labels[private])):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", f"PRIVMETA-{rng.bytes(8).hex()} patient record {i}")
        name = f"PRIVMARK-{i:04d}{rng.bytes(6).hex()}.png"
        Image.fromarray(img, mode="L").save(root / str(label) / name, pnginfo=info)
        names.append(name)
    sources = {"private": {"kind": "imagefolder", "path": str(root)},
               "public": {"kind": "npz", "path": str(folder / "public.npz")},
               "test": {"kind": "npz", "path": str(folder / "test.npz")}}
    public_test = images[np.concatenate([public, test])]
    return PrivateSet(priv, canary, tuple(names)), public_test, sources


# Put first on the `dvc repro` subprocess's PYTHONPATH as `sitecustomize.py`: in every
# process that imports them, `dpsynth.privacy.sampling.poisson_batch` and
# `dpsynth.privacy.per_example.{clipped_sum, per_example_grads}` (and the book-keeping
# engine's `dpsynth.privacy.bookkeeping.{clipped_sum, example_losses}`) are wrapped as
# soon as their module has executed (before `from ... import` copies them elsewhere), and
# what they return -- the size of each Poisson batch, the pre-clipping norms, the
# K-averaged per-example losses -- is appended, in call order, to a JSON-lines file
# per process with its argv, under $EGRESS_TEST_OBSERVED. Lazy: a meta-path finder
# that only answers for those modules, so processes that never import dpsynth
# (dvc, git) pay one `sys.meta_path` entry.
HOOK = '''\
import importlib.abc
import json
import os
import sys

_OUT = os.environ.get("EGRESS_TEST_OBSERVED")
_WRAP = {"dpsynth.privacy.sampling": {"poisson_batch": "batch"},
         "dpsynth.privacy.per_example": {"clipped_sum": "norms", "per_example_grads": "losses"},
         "dpsynth.privacy.bookkeeping": {"clipped_sum": "norms", "example_losses": "losses"}}


def _record(kind, values):
    with open(os.path.join(_OUT, "%d.jsonl" % os.getpid()), "a") as f:
        f.write(json.dumps({"argv": sys.argv, "kind": kind, "values": values}) + "\\n")


def _wrapped(fn, kind):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        _record(kind, [len(out)] if kind == "batch"
                else [float(v) for v in out[1].detach().cpu().reshape(-1)])
        return out
    wrapper.__wrapped__ = fn
    return wrapper


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _WRAP:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            for attr, kind in _WRAP[name].items():
                if callable(getattr(module, attr, None)):  # else nothing is recorded
                    setattr(module, attr, _wrapped(getattr(module, attr), kind))

        spec.loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())
'''


@pytest.fixture(scope="module")
def egress_run(tmp_path_factory: pytest.TempPathFactory, repro_env: dict[str, str],
               repo_copy: Callable[[Path, str], Path]) -> EgressRun:
    """`dvc repro` of the smoke config, on the canary source, in a temp copy of the repo
    (as conftest's `repro`), its stdout / stderr captured to files."""
    private, public_test, sources = write_sources(tmp_path_factory.mktemp("sources"))
    params = load(REPO / "configs" / "smoke.yaml").to_dict()  # resolved, as DVC needs
    params["data"].update(sources)
    root = repo_copy(tmp_path_factory.mktemp("repo"), yaml.safe_dump(params, sort_keys=False))
    logs = tmp_path_factory.mktemp("logs")
    out, err = logs / "dvc-repro.stdout.log", logs / "dvc-repro.stderr.log"
    hook, observed = tmp_path_factory.mktemp("hook"), tmp_path_factory.mktemp("observed")
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(repro_env, EGRESS_TEST_OBSERVED=str(observed),
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [
                   repro_env.get("PYTHONPATH")])]))
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                              stdout=fo, stderr=fe, timeout=900)
    assert proc.returncode == 0, (out.read_text()[-3000:] + err.read_text()[-3000:])
    return EgressRun(root, (out, err), private, public_test, observed)


# --------------------------------------------------------------------------- scanner


def _as_pixels(arr: np.ndarray) -> np.ndarray | None:
    """Image-shaped arrays as float32 (M, 8, 8) on the 0..255 scale, else None.

    Accepts (..., 8, 8) and (..., 8, 8, C); floats in [-1, 1] or [0, 1] are the
    model's and the transforms' scales.
    """
    if arr.dtype.kind not in "uif" or arr.ndim < 2 or arr.size == 0:
        return None
    if arr.shape[-2:] == (SIDE, SIDE):
        stack = arr.reshape(-1, SIDE, SIDE)
    elif arr.ndim >= 3 and arr.shape[-3:-1] == (SIDE, SIDE):
        stack = np.moveaxis(arr, -1, -3).reshape(-1, SIDE, SIDE)
    else:
        return None
    stack = stack.astype(np.float32)
    if arr.dtype.kind == "f" and np.isfinite(stack).all():
        lo, hi = float(stack.min()), float(stack.max())
        if lo >= -1.01 and hi <= 1.01:
            stack = (stack + 1) * 127.5 if lo < 0 else stack * 255
    return stack


def _windows(img: Image.Image) -> np.ndarray:
    """Every 8x8 window of a picture in grey, after undoing a nearest-neighbour
    upscale (sample.save_grid draws each tile 4x, on a 1-pixel white grid)."""
    grey = np.asarray(img.convert("L"))
    h, w = grey.shape
    for s in range(16, 1, -1):  # the largest s for which the picture is s x s blocks
        if h % s == 0 and w % s == 0 and np.array_equal(
                grey, grey[::s, ::s].repeat(s, 0).repeat(s, 1)):
            grey = grey[::s, ::s]
            break
    if min(grey.shape) < SIDE:
        return np.zeros((0, SIDE, SIDE), np.float32)
    win = np.lib.stride_tricks.sliding_window_view(grey, (SIDE, SIDE))
    return win.reshape(-1, SIDE, SIDE).astype(np.float32)


DATA_URI = re.compile(rb"data:image/[a-z]+;base64,([A-Za-z0-9+/=\s]+)")
NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def _printed_images(text: str) -> list[np.ndarray]:
    """Every run of 64 consecutive numbers in a text (an array printed to a log or
    dumped to JSON / CSV) read as an 8x8 image on the 0..255, [0, 1] and [-1, 1] scales."""
    values = np.clip([float(v) for v in NUMBER.findall(text)], -1e6, 1e6).astype(np.float32)
    if len(values) < SIDE * SIDE:
        return []
    win = np.lib.stride_tricks.sliding_window_view(values, SIDE * SIDE).reshape(-1, SIDE, SIDE)
    return [win, win * 255, (win + 1) * 127.5]


def candidate_images(path: Path, data: bytes) -> list[np.ndarray]:
    """The images a file holds, each stack float32 (M, 8, 8): arrays of npz / npy /
    (non-weight) safetensors files, pictures, pictures embedded as data URIs, and
    arrays printed as text."""
    stacks: list[np.ndarray | None] = []
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                stacks += [_as_pixels(z[k]) for k in z.files]
        elif suffix == ".npy":
            stacks.append(_as_pixels(np.load(io.BytesIO(data), allow_pickle=False)))
        elif suffix == ".safetensors":
            from safetensors.numpy import load

            stacks += [_as_pixels(a) for a in load(data).values()]
        elif suffix in (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"):
            stacks.append(_windows(Image.open(io.BytesIO(data))))
    except (ValueError, OSError) as err:  # unreadable: say so rather than skip silently
        raise AssertionError(f"{path}: cannot decode for the scan ({err})") from None
    for match in DATA_URI.finditer(data):
        stacks.append(_windows(Image.open(io.BytesIO(base64.b64decode(match.group(1))))))
    stacks += _printed_images(data.decode("latin-1"))  # text inside binaries too (sqlite)
    return [s for s in stacks if s is not None and len(s)]


def near_duplicates(cands: np.ndarray, private: PrivateSet) -> list[tuple[int, int, float]]:
    """(candidate, private index, MAD) for every pair with MAD < the private image's T.

    Only pairs whose means differ by less than T are compared: |mean(x) - mean(p)|
    <= MAD(x, p), so no near-duplicate is skipped.
    """
    p = private.images.reshape(len(private.images), -1).astype(np.float32)
    c = cands.reshape(len(cands), -1)
    thr = private.thresholds.astype(np.float32)
    found = []
    for start in range(0, len(c), 2048):
        block = c[start:start + 2048]
        i, j = np.nonzero(np.abs(block.mean(1)[:, None] - p.mean(1)[None]) < thr[None])
        for k in range(0, len(i), 100_000):
            ii, jj = i[k:k + 100_000], j[k:k + 100_000]
            mad = np.abs(block[ii] - p[jj]).mean(1)
            hit = mad < thr[jj]
            found += [(int(a) + start, int(b), float(m))
                      for a, b, m in zip(ii[hit], jj[hit], mad[hit])]
    return found


def anchor_index(private: PrivateSet) -> dict[int, list[tuple[int, int]]]:
    """Each private image under its inkiest row (8 bytes read as a little-endian
    uint64): key -> [(image index, row)]."""
    anchors: dict[int, list[tuple[int, int]]] = {}
    for idx, img in enumerate(private.images):
        row = int(np.argmax((img > 0).sum(1)))
        anchors.setdefault(int(np.frombuffer(img[row].tobytes(), "<u8")[0]), []).append(
            (idx, row))
    return anchors


def exact_copies(data: bytes, private: PrivateSet,
                 anchors: dict[int, list[tuple[int, int]]]) -> set[int]:
    """Private images whose 64 raw bytes (row-major, as stored in shards) occur in `data`.

    Every 8-byte word of `data` (at all 8 alignments) is looked up among the
    anchors (`anchor_index`); a hit is confirmed on the full 64 bytes.
    """
    keys = np.array(sorted(anchors), np.uint64)
    found = set()
    for align in range(8):
        count = (len(data) - align) // 8
        if count <= 0:
            continue
        words = np.frombuffer(data, "<u8", count=count, offset=align)
        for h in np.flatnonzero(np.isin(words, keys)):
            for idx, row in anchors[int(words[h])]:
                start = align + 8 * int(h) - SIDE * row
                raw = private.images[idx].tobytes()
                if start >= 0 and data[start:start + len(raw)] == raw:
                    found.add(idx)
    return found


def marker_hits(data: bytes) -> list[str]:
    """The marker prefixes found in `data`, in ASCII/UTF-8 or UTF-16 (any case)."""
    low = data.lower()
    hits = []
    for marker in MARKERS:
        for encoding in ("ascii", "utf-16-le", "utf-16-be"):
            if marker.decode().encode(encoding) in low:
                hits.append(f"{marker.decode()} ({encoding})")
    return hits


def scan(files: list[Path], private: PrivateSet, rel: Path) -> dict[str, list[str]]:
    """Findings by kind ("marker", "exact", "near"): one line per finding."""
    findings: dict[str, list[str]] = {"marker": [], "exact": [], "near": []}
    anchors = anchor_index(private)
    for path in files:
        name = str(path.relative_to(rel)) if path.is_relative_to(rel) else str(path)
        data = path.read_bytes()
        findings["marker"] += [f"{name}: {m}" for m in marker_hits(data)]
        findings["exact"] += [f"{name}: raw bytes of private image {i} ({private.names[i]})"
                              for i in sorted(exact_copies(data, private, anchors))]
        for stack in candidate_images(path, data):
            findings["near"] += [
                f"{name}: image {c} is a near-duplicate of private "
                f"{'canary' if private.canary[p] else 'image'} {p} ({private.names[p]}), "
                f"MAD {mad:.1f}" for c, p, mad in near_duplicates(stack, private)]
    return findings


# --------------------------------------------------------------------------- what is scanned


def _excluded(rel: Path) -> bool:
    return rel.name in WEIGHT_FILES or any(
        rel == Path(e) or Path(e) in rel.parents for e in EXCLUDED)


def mlflow_artifact_dirs(root: Path) -> list[Path]:
    """The local folders the MLflow store puts artifacts in (from its sqlite db)."""
    with sqlite3.connect(root / "mlflow.db") as db:
        uris = [r[0] for r in db.execute("SELECT artifact_location FROM experiments")]
        uris += [r[0] for r in db.execute("SELECT artifact_uri FROM runs")]
    dirs = set()
    for uri in uris:
        parsed = urlparse(uri)
        assert parsed.scheme in ("", "file"), f"MLflow artifact store {uri!r} is not local"
        path = Path(unquote(parsed.path))
        dirs.add(path if path.is_absolute() else root / path)
    return sorted(dirs)


def scanned_files(run: EgressRun) -> list[Path]:
    """Every file of the repo folder but the exclusions, the MLflow artifact folders
    (wherever they are), and the captured logs."""
    root = run.root.resolve()
    tops = [root, *(d for d in mlflow_artifact_dirs(root) if d.exists())]
    files = {p.resolve() for top in tops for p in top.rglob("*") if p.is_file()}
    return sorted(p for p in files if p.name not in WEIGHT_FILES
                  and not (p.is_relative_to(root) and _excluded(p.relative_to(root)))
                  ) + list(run.logs)


@pytest.fixture(scope="module")
def findings(egress_run: EgressRun) -> dict[str, list[str]]:
    return scan(scanned_files(egress_run), egress_run.private, egress_run.root.resolve())


# --------------------------------------------------------------------------- tests


def test_sources_make_a_fair_test(egress_run: EgressRun) -> None:
    """The legitimate public / test images are no near-duplicates of private ones
    (else the scan would flag their copies), and the canaries stand out."""
    private = egress_run.private
    assert private.canary.sum() == NUM_CANARIES
    pt = egress_run.public_test.reshape(len(egress_run.public_test), -1).astype(np.float32)
    p = private.images.reshape(len(private.images), -1).astype(np.float32)
    nearest = np.array([np.abs(pt - img).mean(1).min() for img in p])
    assert nearest[~private.canary].min() >= T_ORDINARY
    assert nearest[private.canary].min() > 2 * T_CANARY
    assert not near_duplicates(egress_run.public_test.astype(np.float32), private)


def test_scan_covers_every_stage_output_and_the_mlflow_store(egress_run: EgressRun) -> None:
    root = egress_run.root.resolve()
    files = scanned_files(egress_run)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in stages:  # foreach / matrix stages are locked as name@key
        assert any(s == stage or s.startswith(f"{stage}@") for s in lock), f"{stage} never ran"
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            path = root / out["path"]
            assert path.exists(), f"{stage}: out {out['path']} is missing"
            covered = [f for f in files if f == path or path in f.parents]
            assert covered or _excluded(Path(out["path"])), (
                f"{stage}: nothing of out {out['path']} is scanned")
    assert root / "mlflow.db" in files and root / "dvc.lock" in files
    artifacts = [f for d in mlflow_artifact_dirs(root) for f in files if d in f.parents]
    assert any(f.suffix == ".png" for f in artifacts), "no MLflow artifact was scanned"
    assert all(log in files and log.stat().st_size > 0 for log in egress_run.logs)
    # the sample grid is read tile by tile (its 4x upscale undone): samples drawn in it
    # come back exactly from its windows
    sample = root / "artifacts" / "sample"
    windows = _windows(Image.open(sample / "grid.png")).reshape(-1, SIDE * SIDE)
    images = read_dataset(sample)[0].reshape(-1, SIDE * SIDE).astype(np.float32)
    drawn = sum(bool((windows == img).all(1).any()) for img in images)
    assert drawn >= min(len(images), 10), f"only {drawn} samples found in grid.png"


def test_no_marker_strings_leave(findings: dict[str, list[str]]) -> None:
    assert not findings["marker"], "\n".join(findings["marker"][:20])


def test_no_exact_copy_of_a_private_image_leaves(findings: dict[str, list[str]]) -> None:
    assert not findings["exact"], "\n".join(findings["exact"][:20])


def test_no_near_duplicate_of_a_private_image_leaves(findings: dict[str, list[str]]) -> None:
    assert not findings["near"], "\n".join(findings["near"][:20])


def test_scanner_finds_planted_copies(egress_run: EgressRun, tmp_path: Path) -> None:
    """The scanner's power: private data planted in copies of real scanned files is found."""
    private, root = egress_run.private, egress_run.root
    canaries, ordinary = np.flatnonzero(private.canary), np.flatnonzero(~private.canary)
    rng = np.random.default_rng(0)

    def noisy(i: int) -> np.ndarray:  # a degraded copy: +-12 levels per pixel, MAD ~6
        return np.clip(private.images[i].astype(int) + rng.integers(-12, 13, (SIDE, SIDE)),
                       0, 255).astype(np.uint8)

    # a marker in a log; a canary printed to a log as a torch-scale array
    log = egress_run.logs[1].read_bytes()
    (tmp_path / "log.txt").write_bytes(log + f"read {private.names[7]}\n".encode())
    printed = np.array2string(private.images[canaries[6]] / 127.5 - 1, precision=4)
    (tmp_path / "log-array.txt").write_bytes(log + f"batch[0]={printed}\n".encode())
    # raw bytes of a private image in a text file
    lock = tmp_path / "dvc.lock"
    text = (root / "dvc.lock").read_bytes()
    lock.write_bytes(text[:100] + private.images[ordinary[3]].tobytes() + text[100:])
    # a degraded canary in a compressed sample shard (no raw bytes to find)
    shard = next((root / "artifacts" / "sample").rglob("*.npz"))
    with np.load(shard) as z:
        arrays = dict(z)
    arrays["images"][2, ..., 0] = noisy(canaries[4])
    np.savez_compressed(tmp_path / "shard.npz", **arrays)
    # an exact private image and a degraded canary as tiles of the sample grid (4x)
    grid = np.asarray(Image.open(root / "artifacts" / "sample" / "grid.png").convert("L")).copy()
    for (row, col), img in (((2, 5), private.images[ordinary[9]]), ((7, 1), noisy(canaries[0]))):
        grid[row * 36:row * 36 + 32, col * 36:col * 36 + 32] = img.repeat(4, 0).repeat(4, 1)
    Image.fromarray(grid).save(tmp_path / "grid.png")
    # a canary embedded in an HTML report as a data URI
    buf = io.BytesIO()
    Image.fromarray(private.images[canaries[9]]).save(buf, format="PNG")
    (tmp_path / "index.html").write_text(
        f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')

    found = scan(sorted(tmp_path.iterdir()), private, tmp_path)
    assert found["marker"] == ["log.txt: privmark (ascii)"]
    assert found["exact"] == [f"dvc.lock: raw bytes of private image {ordinary[3]} "
                              f"({private.names[ordinary[3]]})"]
    near = {(line.split(":")[0], int(re.search(r"(image|canary) (\d+) \(", line)[2]))
            for line in found["near"]}
    assert near == {("shard.npz", canaries[4]), ("grid.png", ordinary[9]),
                    ("grid.png", canaries[0]), ("index.html", canaries[9]),
                    ("log-array.txt", canaries[6])}


# --------------------------------------------------------------------------- numbers (issue 13)

# Inside the private boundary (PRIVACY.md rule 8) as well as `EXCLUDED`, so not scanned
# for numbers: the files that hold q, sigma and the exact epsilon by design, the
# privacy ledger, and the fine-tuning work folder if one is left.
NUMERIC_BOUNDARY = (
    "artifacts/finetune/privacy.json",
    "artifacts/sample/privacy.json",  # sample's copy, for the models it serves
    "artifacts/ledger",
    "artifacts/.work/finetune",
    "artifacts/sweep/eps-*/model/privacy.json",  # each sweep point's, as finetune's
    "artifacts/.work/sweep",
)
# A number with no letter, digit or '_' either side: not a piece of a word or a hash.
TOKEN = re.compile(r"(?<![0-9A-Za-z_])-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?(?![0-9A-Za-z_])")
# Significant digits a written number must have, and agree to, to count as a copy:
DIGITS_SETTING = 3  # q, sigma, exact epsilon: a handful of candidate N each at 3 digits
DIGITS_PER_STEP = 4  # a batch's mean loss / gradient norm (per step and per micro-batch)
# One example's loss or norm: ~200 of them lie in the range where the run prints its
# public losses and accuracies at 4 digits (0.1941, 0.2000 met per-example losses by
# chance), so alone it must be written to 5 digits; or, as a printed tensor or list
# shows them, `EXAMPLE_RUN` consecutive values of one micro-batch in order, to 3.
DIGITS_PER_EXAMPLE = 5
EXAMPLE_RUN, DIGITS_IN_RUN = 3, 3
BATCH_RUN = 5  # consecutive realised batch sizes that make a finding
MAX_STRIDE = 16  # ... found every `stride` numbers: one log line, CSV row or JSON record per step
SIZE, BATCHES = "private split size N", "realised batch sizes"
LOSS, NORM = "private loss", "gradient norm"
MEAN, EXAMPLE = " (batch mean)", " (per example)"
NUMERIC_KINDS = (SIZE, "sample rate q", "noise multiplier sigma", "exact epsilon", BATCHES,
                 LOSS + MEAN, LOSS + EXAMPLE, NORM + MEAN, NORM + EXAMPLE)


@dataclass(frozen=True)
class PrivateNumbers:
    """The numbers only the private data determines, gathered without trusting the product.

    Attributes:
        size: N, the number of private images `write_sources` wrote.
        floats: kind -> (sorted values, significant digits a token must have and agree to).
        examples: kind -> the per-example values of each micro-batch, in call order.
        batch_sizes: the realised Poisson batch sizes of `dpsynth finetune`, in step order.
        note: how the exact epsilon is compared (for messages).
    """

    size: int
    floats: dict[str, tuple[np.ndarray, int]]
    examples: dict[str, list[np.ndarray]]
    batch_sizes: tuple[int, ...]
    note: str

    def value(self, kind: str) -> float:
        return float(self.floats[kind][0][0])


def _sig_round(value: float, digits: int) -> float:
    return float(f"{value:.{digits - 1}e}")


def observed_finetune(observed: Path) -> list[dict[str, list]]:
    """HOOK's records of the `dpsynth finetune` process, one dict per step: its batch
    size and the norms / losses of each micro-batch ("batch", "norms", "losses")."""
    processes = []
    for path in sorted(observed.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if records and records[0]["argv"][1:2] == ["finetune"]:
            processes.append(records)
    assert len(processes) == 1, (f"{len(processes)} `dpsynth finetune` processes recorded "
                                 f"in {observed}: the hook saw no (or several) runs")
    steps: list[dict[str, list]] = []
    for rec in processes[0]:
        if rec["kind"] == "batch":
            steps.append({"batch": rec["values"], "norms": [], "losses": []})
        else:
            assert steps, f"{rec['kind']} recorded before the first Poisson batch"
            steps[-1][rec["kind"]].append(rec["values"])
    return steps


def private_numbers(run: EgressRun) -> PrivateNumbers:
    """N, q = B/N, sigma and the exact epsilon (`privacy.json`), and what the hook saw."""
    fc = yaml.safe_load((run.root / "params.yaml").read_text())["finetune"]
    n = len(run.private.images)
    privacy = json.loads((run.root / "artifacts" / "finetune" / "privacy.json").read_text())
    steps = observed_finetune(run.observed)
    eps, target = float(privacy["epsilon"]), float(fc["epsilon"])
    digits = DIGITS_SETTING
    while _sig_round(eps, digits) == _sig_round(target, digits) and digits < 17:
        digits += 1
    note = (f"exact epsilon {eps!r} compared to {digits} digits" + (
        "" if digits == DIGITS_SETTING else
        f" (to {DIGITS_SETTING} it rounds as the target {target}, which may be published)"))
    floats = {"sample rate q": (np.array([fc["batch_size"] / n]), DIGITS_SETTING),
              "noise multiplier sigma": (np.array([float(privacy["noise_multiplier"])]),
                                         DIGITS_SETTING),
              "exact epsilon": (np.array([eps]), digits)}
    examples = {}
    for kind, key in ((LOSS, "losses"), (NORM, "norms")):
        micro = [np.array(m, np.float64) for s in steps for m in s[key] if len(m)]
        step_means = [np.concatenate(s[key]).mean() for s in steps if sum(map(len, s[key]))]
        # the means a log line would show: per step, and per micro-batch
        floats[kind + MEAN] = (np.sort([*step_means, *(m.mean() for m in micro)]),
                               DIGITS_PER_STEP)
        floats[kind + EXAMPLE] = (np.sort(np.concatenate(micro)), DIGITS_PER_EXAMPLE)
        examples[kind + EXAMPLE] = micro
    return PrivateNumbers(n, floats, examples, tuple(int(s["batch"][0]) for s in steps), note)


@dataclass(frozen=True)
class Stream:
    """The numbers of one file, or of one MLflow metric key / table, in order.

    Attributes:
        name: where they are, for messages.
        tokens: each number as written.
        contexts: the text around each (for messages), or "" where there is none.
    """

    name: str
    tokens: list[str]
    contexts: list[str]

    @staticmethod
    def of_text(name: str, text: str) -> Stream:
        matches = list(TOKEN.finditer(text))
        return Stream(name, [m[0] for m in matches], [
            text[max(0, m.start() - 40):m.end() + 20].replace("\n", " ") for m in matches])


def _token_info(token: str) -> tuple[float, int, float]:
    """(|value|, significant digits, half a unit in the last place written). An integer
    written without a point has its trailing zeros taken as not significant (1000: one)."""
    dec = Decimal(token.rstrip("."))
    if "." not in token and "e" not in token.lower() and dec != 0:
        dec = dec.normalize()
    _, digits, exponent = dec.as_tuple()
    return abs(float(dec)), len(digits), 0.5 * float(Decimal((0, (1,), exponent)))


def _matching(targets: np.ndarray, info: np.ndarray, need: int) -> dict[int, np.ndarray]:
    """token -> positions in sorted `targets` of the values that, rounded to the token's
    significant digits (at least `need`), are the token; for the tokens that have any.

    `info` is `_token_info` of each token: rows (|value|, digits, half a unit)."""
    cand = np.flatnonzero((info[:, 1] >= need) & (info[:, 0] > 0))
    value, digits, half = info[cand, 0], info[cand, 1], info[cand, 2] * (1 + 1e-9)
    lo = np.searchsorted(targets, value - half, side="left")  # within half a unit: a bound
    hi = np.searchsorted(targets, value + half, side="right")
    found = {}
    for k in np.flatnonzero(hi > lo):
        hits = [j for j in range(lo[k], hi[k])
                if math.isclose(_sig_round(targets[j], int(digits[k])), value[k], rel_tol=1e-12)]
        if hits:
            found[int(cand[k])] = np.array(hits)
    return found


def text_streams(files: list[Path], rel: Path) -> list[Stream]:
    """One stream per file, its bytes read as latin-1 (text inside binaries too)."""
    return [Stream.of_text(str(p.relative_to(rel)) if p.is_relative_to(rel) else str(p),
                           p.read_bytes().decode("latin-1")) for p in files]


def mlflow_streams(db: Path, rel: Path) -> list[Stream]:
    """The MLflow store read as values (metrics are 8-byte doubles in the db, no text):
    each run's metric key in step order, then every cell of every table -- params,
    tags, registered models and their versions -- tokenised, row by row."""
    name = str(db.relative_to(rel)) if db.is_relative_to(rel) else str(db)
    streams = []
    with closing(sqlite3.connect(db)) as con:
        series: dict[tuple[str, str], list[str]] = {}
        for run_id, key, value in con.execute(
                "SELECT run_uuid, key, value FROM metrics ORDER BY run_uuid, key, step, timestamp"):
            series.setdefault((run_id, key), []).append(repr(float(value)))
        streams += [Stream(f"{name} metric {key!r} (run {run_id[:8]})", tokens, [""] * len(tokens))
                    for (run_id, key), tokens in series.items()]
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cells = []
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for cell in row:
                    if isinstance(cell, float):
                        cells.append(repr(cell))
                    elif isinstance(cell, int):
                        cells.append(str(cell))
                    elif isinstance(cell, (str, bytes)):
                        cells.append(cell if isinstance(cell, str) else cell.decode("latin-1"))
            streams.append(Stream.of_text(f"{name} table {table}", " | ".join(cells)))
    return streams


def _runs(values: np.ndarray, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stride, first step) of every `BATCH_RUN` consecutive `sizes` found as
    `values[start], values[start + stride], ...`."""
    found = []
    for first in range(len(sizes) - BATCH_RUN + 1):
        want = sizes[first:first + BATCH_RUN]
        for stride in range(1, MAX_STRIDE + 1):
            span = stride * (BATCH_RUN - 1)
            if len(values) <= span:
                break
            ok = values[:len(values) - span] == want[0]
            for j in range(1, BATCH_RUN):
                ok &= values[j * stride:len(values) - span + j * stride] == want[j]
            found += [(int(s), stride, first) for s in np.flatnonzero(ok)]
    return found


def _example_runs(info: np.ndarray, micro: list[np.ndarray]) -> list[tuple[int, int, int]]:
    """(first token, micro-batch, first example) of every `EXAMPLE_RUN` consecutive
    tokens that are consecutive per-example values of one micro-batch, in order."""
    ordered = np.concatenate(micro)
    batch_of = np.repeat(np.arange(len(micro)), [len(m) for m in micro])
    start_of = np.cumsum([0] + [len(m) for m in micro])
    order = np.argsort(ordered, kind="stable")
    hits = {i: set(order[pos].tolist())
            for i, pos in _matching(ordered[order], info, DIGITS_IN_RUN).items()}
    found = []
    for i, examples in hits.items():
        for g in sorted(examples):
            end = g + EXAMPLE_RUN - 1
            if end < len(ordered) and batch_of[end] == batch_of[g] and all(
                    g + j in hits.get(i + j, ()) for j in range(1, EXAMPLE_RUN)):
                found.append((i, int(batch_of[g]), g - int(start_of[batch_of[g]])))
                break
    return found


def numeric_scan(streams: list[Stream], numbers: PrivateNumbers) -> dict[str, list[str]]:
    """Findings by kind (`NUMERIC_KINDS`), one line per finding:
    - N: a token of exactly that integer value (1063, 1063.0, 1.063e3);
    - a float kind: a token with d >= the kind's significant digits that is one of its
      values rounded to d significant digits (0.0301 is q = 0.030103... to 3; 10.0 is not
      epsilon = 9.9873 to 3, 9.99 is);
    - per-example values also: `EXAMPLE_RUN` consecutive tokens, each one of a micro-batch's
      consecutive values to `DIGITS_IN_RUN` digits or more (a printed tensor);
    - batch sizes: `BATCH_RUN` consecutive realised sizes, in order, every `stride`
      numbers of a stream."""
    found: dict[str, list[str]] = {kind: [] for kind in NUMERIC_KINDS}
    for stream in streams:
        if not stream.tokens:
            continue
        info = np.array([_token_info(t) for t in stream.tokens], np.float64).reshape(-1, 3)

        def line(i: int, kind: str, private: object, span: int = 1) -> str:
            where = f" in {stream.contexts[i]!r}" if stream.contexts[i] else ""
            return (f"{stream.name}: {kind} {' '.join(stream.tokens[i:i + span])} "
                    f"(private {private}){where}")

        found[SIZE] += [line(i, SIZE, numbers.size)
                        for i in np.flatnonzero(info[:, 0] == numbers.size)]
        for kind, (targets, need) in numbers.floats.items():
            found[kind] += [line(i, kind, repr(float(targets[pos[0]])))
                            for i, pos in sorted(_matching(targets, info, need).items())]
        for kind, micro in numbers.examples.items():
            found[kind] += [
                line(i, kind, f"examples {j + 1}-{j + EXAMPLE_RUN} of micro-batch {b + 1}: "
                     f"{[float(v) for v in micro[b][j:j + EXAMPLE_RUN]]}", EXAMPLE_RUN)
                for i, b, j in _example_runs(info, micro)]
        ints = np.where(info[:, 0] == np.round(info[:, 0]), info[:, 0], -1.0)
        found[BATCHES] += [
            line(start, BATCHES, f"steps {first + 1}-{first + BATCH_RUN}: "
                 f"{list(numbers.batch_sizes[first:first + BATCH_RUN])}") + f", stride {stride}"
            for start, stride, first in _runs(ints, numbers.batch_sizes)]
    return found


def _source_hashes(run: EgressRun) -> set[str]:
    """sha256 of every file of the source code: the run's copy and the tree the venv
    imports (MLflow ships that one with the registered models, as `code/`)."""
    trees = (run.root / "src", REPO / "src")
    return {hashlib.sha256(f.read_bytes()).hexdigest()
            for tree in trees for f in tree.rglob("*.py") if f.is_file()}


def numeric_scanned_files(run: EgressRun) -> list[Path]:
    """`scanned_files` less the private boundary (`NUMERIC_BOUNDARY`) and verbatim copies
    of the source code (an input, as in `EXCLUDED`: its numbers are the developers')."""
    root = run.root.resolve()
    inside = [b for pattern in NUMERIC_BOUNDARY for b in root.glob(pattern)]
    source = _source_hashes(run)
    return [f for f in scanned_files(run) if not any(f == b or b in f.parents for b in inside)
            and not (f.suffix == ".py" and hashlib.sha256(f.read_bytes()).hexdigest() in source)]


def all_streams(files: list[Path], rel: Path) -> list[Stream]:
    """The files' text streams, and each MLflow db's values."""
    streams = text_streams(files, rel)
    for db in (f for f in files if f.name == "mlflow.db"):
        streams += mlflow_streams(db, rel)
    return streams


@pytest.fixture(scope="module")
def numbers(egress_run: EgressRun) -> PrivateNumbers:
    return private_numbers(egress_run)


@pytest.fixture(scope="module")
def numeric_streams(egress_run: EgressRun) -> list[Stream]:
    return all_streams(numeric_scanned_files(egress_run), egress_run.root.resolve())


@pytest.fixture(scope="module")
def numeric_findings(numeric_streams: list[Stream], numbers: PrivateNumbers
                     ) -> dict[str, list[str]]:
    return numeric_scan(numeric_streams, numbers)


def test_hook_observed_the_private_run(egress_run: EgressRun, numbers: PrivateNumbers) -> None:
    """The values looked for are the run's: the hook saw every step of `dpsynth finetune`
    and every example of each batch, and prepare kept every private image (N)."""
    params = yaml.safe_load((egress_run.root / "params.yaml").read_text())
    steps = observed_finetune(egress_run.observed)
    assert len(steps) == params["finetune"]["steps"], "the hook missed Poisson batches"
    for i, step in enumerate(steps):
        for kind in ("losses", "norms"):
            assert sum(map(len, step[kind])) == step["batch"][0], (
                f"step {i + 1}: {kind} of {sum(map(len, step[kind]))} examples recorded, "
                f"the batch has {step['batch'][0]}")
    assert sum(numbers.batch_sizes) > 0, "no private example was ever sampled"
    manifest = json.loads(
        (egress_run.root / "artifacts" / "prepare" / "private" / "manifest.json").read_text())
    assert manifest["count"] == numbers.size, "prepare dropped private images"


def test_private_numbers_are_distinctive(numeric_streams: list[Stream],
                                         numbers: PrivateNumbers) -> None:
    """A finding is not chance: no integer near N is written anywhere scanned (so the
    run's own numbers do not crowd N), the batch sizes are not one repeated value, and
    epsilon can be told from its target at the digits it is compared to."""
    near = {v for v in range(numbers.size - 5, numbers.size + 6) if v != numbers.size}
    hits = [f"{stream.name}: {t}" for stream in numeric_streams for t in stream.tokens
            if _token_info(t)[0] in near]
    assert not hits, ("integers next to N are written; choose a rarer N in write_sources:\n"
                      + "\n".join(hits[:20]))
    assert len(set(numbers.batch_sizes)) >= 3, numbers.batch_sizes
    assert numbers.floats["exact epsilon"][1] <= DIGITS_PER_STEP, numbers.note


@pytest.mark.parametrize("kind", NUMERIC_KINDS)
def test_no_private_number_leaves(kind: str, numeric_findings: dict[str, list[str]],
                                  numbers: PrivateNumbers) -> None:
    note = f" ({numbers.note})" if kind == "exact epsilon" else ""
    assert not numeric_findings[kind], (f"{len(numeric_findings[kind])} findings{note}:\n"
                                        + "\n".join(numeric_findings[kind][:30]))


def test_numeric_scanner_finds_planted_values(egress_run: EgressRun, numbers: PrivateNumbers,
                                              tmp_path: Path) -> None:
    """The numeric scan's power: each kind of private number planted in copies of real
    scanned files (a metrics.json, a log, the report, the MLflow db as metric values and
    a tag) is found there, and nothing else is found in them than in the unmodified
    copies (which `test_no_private_number_leaves` requires to be clean)."""
    root = egress_run.root.resolve()
    n, sizes, eps_digits = numbers.size, numbers.batch_sizes, numbers.floats["exact epsilon"][1]
    q, sigma, eps = map(numbers.value, ("sample rate q", "noise multiplier sigma",
                                        "exact epsilon"))

    def pick(kind: str, write: Callable[[float], str]) -> float:
        """A value of `kind` that, written so, is a finding of that kind alone (the mean of
        a one-example micro-batch is also a per-example value)."""
        def only(token: str) -> bool:
            found = numeric_scan([Stream("x", [token], [""])], numbers)
            return [k for k, lines in found.items() if lines] == [kind]
        return next(float(v) for v in numbers.floats[kind][0] if only(write(float(v))))

    loss_mean = pick(LOSS + MEAN, lambda v: f"{v:#.{DIGITS_PER_STEP}g}")
    norm_mean = pick(NORM + MEAN, lambda v: f"{v:#.{DIGITS_PER_STEP}g}")
    db_loss, norm = pick(LOSS + MEAN, repr), pick(NORM + EXAMPLE, repr)
    micro_losses = next(m for m in numbers.examples[LOSS + EXAMPLE] if len(m) >= EXAMPLE_RUN + 1)
    sources = {"metrics.json": root / "artifacts" / "finetune" / "metrics.json",
               "log.txt": egress_run.logs[1],
               "index.html": root / "artifacts" / "report" / "index.html",
               "mlflow.db": root / "mlflow.db"}
    clean, planted = tmp_path / "clean", tmp_path / "planted"
    for folder in (clean, planted):
        folder.mkdir()
        for name, src in sources.items():
            shutil.copy(src, folder / name)
    metrics = json.loads((planted / "metrics.json").read_text())
    metrics |= {"private_images": n, "train_loss": float(f"{loss_mean:.{DIGITS_PER_STEP}g}")}
    (planted / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # q in full; a log line per step (the sizes every 3 numbers); a micro-batch's losses
    # as torch prints a tensor (4 decimals)
    printed = ", ".join(f"{v:.4f}" for v in micro_losses[:EXAMPLE_RUN + 1])
    with open(planted / "log.txt", "a") as f:
        f.write(f"INFO sample_rate={q!r}\n" + "".join(
            f"INFO step {i + 1}: batch of {b} examples, loss 0.{i}\n" for i, b in enumerate(sizes))
            + f"DEBUG losses tensor([{printed}])\n")
    html = (planted / "index.html").read_text()
    (planted / "index.html").write_text(html.replace("</body>", (
        f"<table><tr><td>σ = {sigma:#.{DIGITS_SETTING}g}</td><td>ε = {eps:#.{eps_digits}g}</td>"
        f"<td>mean norm {norm_mean:#.{DIGITS_PER_STEP}g}</td></tr></table></body>"), 1))
    with closing(sqlite3.connect(planted / "mlflow.db")) as db, db:
        run_id = db.execute("SELECT run_uuid FROM runs LIMIT 1").fetchone()[0]
        db_kinds = {"planted_size": (SIZE, float(n)), "planted_q": ("sample rate q", q),
                    "planted_sigma": ("noise multiplier sigma", sigma),
                    "planted_epsilon": ("exact epsilon", eps),
                    "planted_norm": (NORM + EXAMPLE, norm),
                    "planted_loss": (LOSS + MEAN, db_loss)}
        rows = [(key, value, 0) for key, (_, value) in db_kinds.items()]
        rows += [("planted_batch_size", float(b), i + 1) for i, b in enumerate(sizes)]
        db.executemany("INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
                       "VALUES (?, ?, 0, ?, 0, ?)", [(*r, run_id) for r in rows])
        db.execute("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                   ("planted_note", f"a private split of {n} images", run_id))
    db_kinds["planted_batch_size"] = (BATCHES, 0.0)

    def counts(folder: Path) -> Counter[tuple[str, str]]:
        found = numeric_scan(all_streams(sorted(folder.iterdir()), folder), numbers)
        return Counter((line.split(": ")[0], kind) for kind, lines in found.items()
                       for line in lines)

    before, after = counts(clean), counts(planted)
    new = {where for where, count in after.items() if count > before[where]}
    metric = f"mlflow.db metric {{!r}} (run {run_id[:8]})".format
    expected = {("metrics.json", SIZE), ("metrics.json", LOSS + MEAN),
                ("log.txt", "sample rate q"), ("log.txt", BATCHES), ("log.txt", LOSS + EXAMPLE),
                ("index.html", "noise multiplier sigma"), ("index.html", "exact epsilon"),
                ("index.html", NORM + MEAN),
                *((metric(key), kind) for key, (kind, _) in db_kinds.items()),
                # the generic table scan sees the same values, row by row (stride 6: a
                # metric row's cells), and the tag's text
                *(("mlflow.db table metrics", kind) for kind, _ in db_kinds.values()),
                ("mlflow.db table tags", SIZE)}
    if f" {n} ".encode() in (planted / "mlflow.db").read_bytes():  # the tag's text, raw
        expected.add(("mlflow.db", SIZE))
    assert new == expected, ("not found:\n" + "\n".join(map(str, sorted(expected - new)))
                             + "\nfound but not planted:\n"
                             + "\n".join(map(str, sorted(new - expected))))
