"""`dpsynth.stages.sample`: shard arithmetic, sharding equivalence (fan-out then
merge == all at once), resume, tamper detection, merge errors, output layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import dpsynth
from dpsynth.config import Config
from dpsynth.diffusion.unet import EMA_WEIGHTS
from dpsynth.errors import InputError
from dpsynth.io.shards import (MANIFEST, read_dataset, read_manifest, sha256_file,
                               shard_name)
from dpsynth.stages import sample
from dpsynth.stages.common import work_dir_for
from dpsynth.tracking import NullTracker, flatten

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SECTIONS = ("seed", "diffusion", "sample")
SHARD_FILES = [shard_name(i) for i in range(3)]  # tiny config: sample.num_shards = 3


def assert_same_dataset(out: Path, reference: Path) -> None:
    """Byte-identical shard files and the same manifest."""
    for name in SHARD_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    manifest, expected = (json.loads((d / MANIFEST).read_text()) for d in (out, reference))
    assert manifest == expected


# --------------------------------------------------------------------------- arithmetic


def test_shard_bounds_partition_exactly() -> None:
    cases = [(n, k) for n in range(1, 40) for k in range(1, n + 1)]
    cases += [(10_000, 7), (50_000, 64), (2**31 + 5, 1000)]
    for n, k in cases:
        bounds = [sample.shard_bounds(n, k, i) for i in range(k)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n, (n, k)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), (n, k)  # contiguous
        sizes = [stop - start for start, stop in bounds]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, (n, k, sizes)


def test_labels_are_class_balanced_overall() -> None:
    n, k, num_classes = 103, 7, 10
    labels = torch.cat([sample.shard_labels(*sample.shard_bounds(n, k, i), num_classes)
                        for i in range(k)])
    assert torch.equal(labels, torch.arange(n) % num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    assert counts.max() - counts.min() <= 1


def test_shard_seed_depends_on_seed_and_index() -> None:
    seeds = {sample.shard_seed(s, i) for s in range(5) for i in range(20)}
    assert len(seeds) == 100
    assert sample.shard_seed(3, 4) == sample.shard_seed(3, 4)
    assert all(0 <= s < 2**63 for s in seeds)


# --------------------------------------------------------------------------- equivalence


def test_fan_out_then_merge_equals_all_at_once(tmp_path: Path, tiny_cfg: Config,
                                               pretrained_dir: Path, sampled_dir: Path) -> None:
    dirs = []
    for i in (2, 0, 1):  # any order, one shard per "machine"
        made, skipped = sample.make_shards(tiny_cfg, model_dir=pretrained_dir,
                                           shard_dir=tmp_path / f"machine{i}", indices=[i])
        assert (made, skipped) == ([i], [])
        dirs.append(tmp_path / f"machine{i}")
    merged = tmp_path / "merged"
    merged.mkdir()
    manifest = sample.merge_shards(dirs, merged, num_shards=3,
                                   source=read_manifest(sampled_dir).source)
    assert manifest == read_manifest(sampled_dir)
    assert_same_dataset(merged, sampled_dir)


def test_the_cli_merge_publishes_what_one_sample_run_publishes(
        tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`dpsynth sample --shard-index` on each machine, then `--merge`: the same shards,
    manifest and grid as one run, and the model's privacy.json and metrics with them."""
    import yaml

    from dpsynth import cli

    monkeypatch.setenv("DPSYNTH_THREADS", "1")  # the reference's thread count: same bytes
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg.to_dict() | {"tracking": {"enabled": False}}))
    model = tmp_path / "dp_model"
    shutil.copytree(pretrained_dir, model)
    (model / "privacy.json").write_text(json.dumps({"epsilon": 9.5, "delta": 1e-5}))
    shards = []
    for i in range(3):
        shards.append(str(tmp_path / f"machine{i}"))
        assert cli.main(["sample", "-q", "--config", str(config), "--model", str(model),
                         "--shard-index", str(i), "--out", shards[-1]]) == 0
    out = tmp_path / "merged"
    assert cli.main(["sample", "-q", "--config", str(config), "--model", str(model),
                     "--merge", *shards, "--out", str(out)]) == 0
    reference = tmp_path / "reference"
    sample.run(tiny_cfg, model_dir=model, out_dir=reference, tracker=NullTracker())
    assert_same_dataset(out, reference)
    for name in ("grid.png", "privacy.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 30 and metrics["shards_made"] == 3
    assert metrics["sample_seconds"] is None  # made elsewhere: not known here
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_shard_depends_on_seed_and_index_only(tmp_path: Path, tiny_cfg: Config,
                                              make_cfg: Callable[..., Config],
                                              pretrained_dir: Path, sampled_dir: Path) -> None:
    def shard_1(cfg: Config, where: str) -> bytes:
        sample.make_shards(cfg, model_dir=pretrained_dir, shard_dir=tmp_path / where,
                           indices=[1])
        return (tmp_path / where / shard_name(1)).read_bytes()

    assert shard_1(tiny_cfg, "a") == (sampled_dir / shard_name(1)).read_bytes()
    assert shard_1(tiny_cfg, "b") == (sampled_dir / shard_name(1)).read_bytes()
    other_seed = shard_1(make_cfg("seed=1"), "c")
    assert other_seed != (sampled_dir / shard_name(1)).read_bytes()
    # same labels (they depend on the position only), different images
    images, labels, _ = read_dataset(sampled_dir)
    start, stop = sample.shard_bounds(30, 3, 1)
    with np.load(tmp_path / "c" / shard_name(1)) as z:
        assert np.array_equal(z["labels"], labels[start:stop])
        assert not np.array_equal(z["images"], images[start:stop])
    # and two shards of one run are not copies of each other
    assert not np.array_equal(images[0:10], images[10:20])


# --------------------------------------------------------------------------- resume


def test_resume_skips_finished_shards(tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path,
                                      sampled_dir: Path) -> None:
    out = tmp_path / "sample"
    sample.make_shards(tiny_cfg, model_dir=pretrained_dir, shard_dir=work_dir_for(out),
                       indices=[0, 2])
    result = sample.run(tiny_cfg, model_dir=pretrained_dir, out_dir=out, tracker=NullTracker())
    assert result.shards_skipped == (0, 2) and result.shards_made == (1,)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shards_skipped"] == 2 and metrics["shards_made"] == 1
    assert_same_dataset(out, sampled_dir)
    assert not work_dir_for(out).exists()


def test_tampered_shard_is_remade(tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path,
                                  sampled_dir: Path) -> None:
    out = tmp_path / "sample"
    work = work_dir_for(out)
    sample.make_shards(tiny_cfg, model_dir=pretrained_dir, shard_dir=work)
    images, labels, _ = read_dataset(sampled_dir)
    np.savez(work / shard_name(1), images=255 - images[10:20], labels=labels[10:20])

    result = sample.run(tiny_cfg, model_dir=pretrained_dir, out_dir=out, tracker=NullTracker())
    assert result.shards_made == (1,) and result.shards_skipped == (0, 2)
    assert_same_dataset(out, sampled_dir)


def test_shards_of_another_config_are_remade(tmp_path: Path, tiny_cfg: Config,
                                             make_cfg: Callable[..., Config],
                                             pretrained_dir: Path, sampled_dir: Path) -> None:
    out = tmp_path / "sample"
    sample.make_shards(make_cfg("seed=7"), model_dir=pretrained_dir, shard_dir=work_dir_for(out))
    result = sample.run(tiny_cfg, model_dir=pretrained_dir, out_dir=out, tracker=NullTracker())
    assert result.shards_made == (0, 1, 2) and result.shards_skipped == ()
    assert_same_dataset(out, sampled_dir)


# --------------------------------------------------------------------------- merge errors


@pytest.fixture
def machine_dirs(tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path) -> Callable[..., Path]:
    """`machine("m", 0, 2)`: a folder holding (copies of) the given finished shards."""
    full = tmp_path / "full"
    sample.make_shards(tiny_cfg, model_dir=pretrained_dir, shard_dir=full)

    def machine(name: str, *indices: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        for i in indices:
            for f in (shard_name(i), shard_name(i).replace(".npz", ".json")):
                shutil.copyfile(full / f, d / f)
        return d

    return machine


def test_merge_refuses_missing_shard(tmp_path: Path, machine_dirs: Callable[..., Path]) -> None:
    dirs = [machine_dirs("a", 0), machine_dirs("b", 2)]
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"shards \[1\] of 3 are missing.*--shard-index"):
        sample.merge_shards(dirs, tmp_path / "out", num_shards=3, source="x")
    assert list((tmp_path / "out").iterdir()) == []


def test_merge_refuses_duplicate_shard(tmp_path: Path,
                                       machine_dirs: Callable[..., Path]) -> None:
    a, b = machine_dirs("a", 0, 1), machine_dirs("b", 1, 2)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"shard 1 appears in both .*a.* and .*b.*once"):
        sample.merge_shards([a, b], tmp_path / "out", num_shards=3, source="x")


def test_merge_refuses_tampered_shard(tmp_path: Path,
                                      machine_dirs: Callable[..., Path]) -> None:
    a = machine_dirs("a", 0, 1, 2)
    data = bytearray((a / shard_name(2)).read_bytes())
    data[-1] ^= 0xFF
    (a / shard_name(2)).write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"shard-00002\.npz: sha256 does not match"):
        sample.merge_shards([a], tmp_path / "out", num_shards=3, source="x")


def test_merge_refuses_shards_of_different_configs(
        tmp_path: Path, make_cfg: Callable[..., Config], pretrained_dir: Path,
        machine_dirs: Callable[..., Path]) -> None:
    a = machine_dirs("a", 0, 1)
    b = tmp_path / "b"  # shard 2 sampled with another seed: a stale or misconfigured worker
    sample.make_shards(make_cfg("seed=5"), model_dir=pretrained_dir, shard_dir=b, indices=[2])
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"shards \[\[0, 1\], \[2\]\] were made with different"):
        sample.merge_shards([a, b], tmp_path / "out", num_shards=3, source="x")
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- layout


def test_output_layout(sampled_dir: Path, tiny_cfg: Config) -> None:
    names = {p.name for p in sampled_dir.iterdir()}
    assert names == {MANIFEST, "grid.png", "metrics.json", "params.json", "version.json",
                     *SHARD_FILES}

    images, labels, manifest = read_dataset(sampled_dir)  # verifies every hash
    assert images.shape == (30, 8, 8, 1) and images.dtype == np.uint8
    assert manifest.classes == tuple(str(k) for k in range(10))
    assert [s.count for s in manifest.shards] == [10, 10, 10]
    assert np.array_equal(labels, np.arange(30) % 10)  # balanced: 3 per class
    assert images.std() > 0  # not a blank image

    grid = np.asarray(Image.open(sampled_dir / "grid.png"))
    scale, per_class, h = 4, 10, 8
    assert grid.shape == (10 * (h + 1) * scale, per_class * (h + 1) * scale)  # rows = classes
    for k in range(10):  # row k, column 0 is the first sample of class k
        first = images[np.flatnonzero(labels == k)[0], ..., 0]
        top = k * (h + 1) * scale
        cell = grid[top:top + h * scale, :h * scale]
        assert np.array_equal(cell, first.repeat(scale, 0).repeat(scale, 1)), k

    metrics = json.loads((sampled_dir / "metrics.json").read_text())
    assert set(metrics) == {"num_samples", "shards_made", "shards_skipped", "sample_seconds",
                            "images_per_second"}
    assert metrics["num_samples"] == 30 and metrics["shards_made"] == 3
    assert metrics["shards_skipped"] == 0
    assert json.loads((sampled_dir / "params.json").read_text()) == tiny_cfg.section(*SECTIONS)
    version = json.loads((sampled_dir / "version.json").read_text())
    assert version["stage"] == "sample" and version["dpsynth"] == dpsynth.__version__
    assert not work_dir_for(sampled_dir).exists()


def test_tracker_gets_config_and_grid(tmp_path: Path, tiny_cfg: Config,
                                      pretrained_dir: Path) -> None:
    tracker = NullTracker()
    out = tmp_path / "sample"
    sample.run(tiny_cfg, model_dir=pretrained_dir, out_dir=out, tracker=tracker)
    assert tracker.params == flatten(tiny_cfg.section(*SECTIONS)) | {
        "model_sha256": sha256_file(pretrained_dir / EMA_WEIGHTS)}
    assert tracker.artifacts == [out / "grid.png"]
    (metrics, step), = tracker.metrics
    assert metrics["num_samples"] == 30.0 and step is None


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("index", [3, -1])
def test_out_of_range_shard_index(tmp_path: Path, tiny_cfg: Config, pretrained_dir: Path,
                                  index: int) -> None:
    with pytest.raises(InputError, match=rf"--shard-index {index}: .*num_shards=3"):
        sample.make_shards(tiny_cfg, model_dir=pretrained_dir, shard_dir=tmp_path / "s",
                           indices=[index])
    assert not (tmp_path / "s").exists()


def test_missing_model_dir(tmp_path: Path, tiny_cfg: Config) -> None:
    missing = tmp_path / "no-such-model"
    out = tmp_path / "sample"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        sample.run(tiny_cfg, model_dir=missing, out_dir=out, tracker=NullTracker())
    with pytest.raises(InputError, match=re.escape(str(missing))):
        sample.make_shards(tiny_cfg, model_dir=missing, shard_dir=tmp_path / "s")
    assert not out.exists() and not work_dir_for(out).exists()
