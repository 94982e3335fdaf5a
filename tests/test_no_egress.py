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
"""

from __future__ import annotations

import base64
import io
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import yaml
from PIL import Image, PngImagePlugin

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
    public, test, private = order[:450], order[450:810], order[810:]
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


@pytest.fixture(scope="module")
def egress_run(tmp_path_factory: pytest.TempPathFactory, repro_env: dict[str, str],
               repo_copy: Callable[[Path, str], Path]) -> EgressRun:
    """`dvc repro` of the smoke config, on the canary source, in a temp copy of the repo
    (as conftest's `repro`), its stdout / stderr captured to files."""
    private, public_test, sources = write_sources(tmp_path_factory.mktemp("sources"))
    params = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    params["data"].update(sources)
    root = repo_copy(tmp_path_factory.mktemp("repo"), yaml.safe_dump(params, sort_keys=False))
    logs = tmp_path_factory.mktemp("logs")
    out, err = logs / "dvc-repro.stdout.log", logs / "dvc-repro.stderr.log"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=repro_env,
                              stdout=fo, stderr=fe, timeout=900)
    assert proc.returncode == 0, (out.read_text()[-3000:] + err.read_text()[-3000:])
    return EgressRun(root, (out, err), private, public_test)


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
