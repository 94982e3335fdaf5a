"""Checkpoints resume bit-for-bit, publish atomically, prune, and refuse corrupt state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from dpsynth.config import DiffusionConfig, ModelConfig
from dpsynth.diffusion.ema import EMA
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.diffusion.unet import UNetSpec, build_unet
from dpsynth.errors import InputError
from dpsynth.training import checkpoint
from dpsynth.training.checkpoint import LATEST, TrainState, load_latest, save_checkpoint

SPEC = UNetSpec(8, 1, 3, ModelConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                     attention_levels=(1,)))


class Trainer:
    """The pre-training loop in miniature: UNet, AdamW, EMA, one generator for data
    indices and loss draws, exactly as `stages/pretrain.py` uses them."""

    def __init__(self, device: str = "cpu") -> None:
        torch.manual_seed(0)
        self.net = build_unet(SPEC).train().to(device)
        self.ema = EMA(self.net, 0.9)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2, weight_decay=0.01)
        self.gen = torch.Generator().manual_seed(1)
        self.loss = DenoisingLoss.from_config(DiffusionConfig(label_dropout=0.2),
                                              SPEC.null_label)
        g = torch.Generator().manual_seed(2)
        self.x = (torch.rand(16, 1, 8, 8, generator=g) * 2 - 1).to(device)
        self.y = torch.randint(0, 3, (16,), generator=g).to(device)
        self.step = 0

    def train(self, n: int) -> None:
        for _ in range(n):
            idx = torch.randint(0, len(self.x), (4,), generator=self.gen).to(self.x.device)
            loss = self.loss(self.net, self.x[idx], self.y[idx], self.gen).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.ema.update(self.net)
            self.step += 1

    def state(self) -> TrainState:
        return TrainState(step=self.step, net=self.net.state_dict(),
                          ema=self.ema.shadow.state_dict(), optimizer=self.opt.state_dict(),
                          generator=self.gen.get_state(),
                          meta={"ema_num_updates": self.ema.num_updates,
                                "history": [[1, 0.5], [2, 0.25]], "run_id": "abc"})

    def restore(self, state: TrainState) -> None:
        self.net.load_state_dict(state.net)
        self.ema.shadow.load_state_dict(state.ema)
        self.ema.num_updates = state.meta["ema_num_updates"]
        self.opt.load_state_dict(state.optimizer)
        self.gen.set_state(state.generator)
        self.step = state.step


def tiny_state(step: int, value: float = 0.0) -> TrainState:
    net = {"w": torch.full((2, 3), value), "b": torch.arange(3.0)}
    return TrainState(step=step, net=net, ema={k: v + 1 for k, v in net.items()},
                      optimizer={"state": {0: {"step": torch.tensor(float(step)),
                                               "exp_avg": torch.full((2, 3), value)}},
                                 "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99],
                                                   "params": [0]}]},
                      generator=torch.Generator().manual_seed(step).get_state(),
                      meta={"step_seen": step})


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_resume_is_bit_identical_to_continuing_in_memory(tmp_path: Path) -> None:
    a = Trainer()
    a.train(3)
    save_checkpoint(tmp_path, a.state())
    a.train(3)  # keep going in memory

    b = Trainer()  # a fresh process: different in-memory state until restored
    state = load_latest(tmp_path)
    assert state is not None and state.step == 3
    b.restore(state)
    b.train(3)

    assert b.step == a.step == 6
    assert_same_tensors(b.net.state_dict(), a.net.state_dict())
    assert_same_tensors(b.ema.shadow.state_dict(), a.ema.shadow.state_dict())
    assert torch.equal(b.gen.get_state(), a.gen.get_state())
    opt_a, opt_b = a.opt.state_dict(), b.opt.state_dict()
    for i in opt_a["state"]:
        assert_same_tensors(opt_b["state"][i], opt_a["state"][i])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_of_a_device_run_holds_cpu_tensors_and_resumes_anywhere(
        tmp_path: Path, device: str) -> None:
    """Checkpoints are device-independent: CPU tensors on disk, whatever trained them,
    restored exactly into a CPU run, which then continues."""
    a = Trainer(device)
    a.train(3)
    save_checkpoint(tmp_path, a.state())
    at_save = {k: v.cpu().clone() for k, v in a.net.state_dict().items()}
    moments = {i: {k: v.cpu().clone() for k, v in s.items()}
               for i, s in a.opt.state_dict()["state"].items()}
    state = load_latest(tmp_path)
    assert state is not None
    tensors = [*state.net.values(), *state.ema.values(),
               *(v for s in state.optimizer["state"].values() for v in s.values())]
    assert all(t.device.type == "cpu" for t in tensors)
    b = Trainer("cpu")
    b.restore(state)
    assert_same_tensors(b.net.state_dict(), at_save)
    for i, s in b.opt.state_dict()["state"].items():
        assert_same_tensors(s, moments[i])
    b.train(2)
    assert b.step == 5


def test_resume_check_has_power(tmp_path: Path) -> None:
    # the same comparison fails if one piece of state (here Adam's moments) is lost
    a = Trainer()
    a.train(3)
    save_checkpoint(tmp_path, a.state())
    a.train(2)
    b = Trainer()
    state = load_latest(tmp_path)
    assert state is not None
    state.optimizer = Trainer().opt.state_dict()  # empty Adam state
    b.restore(state)
    b.train(2)
    assert not all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))


def test_round_trip_is_exact(tmp_path: Path) -> None:
    t = Trainer()
    t.train(2)
    saved = t.state()
    path = save_checkpoint(tmp_path, saved)
    assert path == tmp_path / "ckpt-00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "state.json", "state.safetensors"]
    got = load_latest(tmp_path)
    assert got is not None
    assert got.step == 2 and got.meta == saved.meta
    assert_same_tensors(got.net, saved.net)
    assert_same_tensors(got.ema, saved.ema)
    assert torch.equal(got.generator, saved.generator) and got.generator.dtype == torch.uint8
    want_opt = saved.optimizer
    assert got.optimizer["state"].keys() == want_opt["state"].keys()
    for i in want_opt["state"]:
        assert_same_tensors(got.optimizer["state"][i], want_opt["state"][i])
    assert json.loads(json.dumps(want_opt["param_groups"])) == got.optimizer["param_groups"]
    t.opt.load_state_dict(got.optimizer)  # torch accepts it


def test_no_pickle_anywhere(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, tiny_state(1))
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x02" and head[:1] != b"\x80" and head != b"PK", f.name


def test_latest_points_at_the_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, tiny_state(step, value=step), keep=5)
        assert json.loads((tmp_path / LATEST).read_text()) == {
            "checkpoint": f"ckpt-{step:08d}", "step": step}
        got = load_latest(tmp_path)
        assert got is not None and got.step == step
        assert float(got.net["w"][0, 0]) == step
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000001", "ckpt-00000002", "ckpt-00000003", LATEST]


@pytest.mark.parametrize("keep, left", [(1, [5]), (2, [4, 5]), (3, [3, 4, 5])])
def test_keep_prunes_older_checkpoints(tmp_path: Path, keep: int, left: list[int]) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, tiny_state(step), keep=keep)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == [f"ckpt-{s:08d}" for s in left]


def test_a_crashed_write_is_ignored(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, tiny_state(1, value=1.0))
    # a kill mid-write leaves a temporary folder with a higher step and junk in it
    leftover = tmp_path / ".ckpt-00000009.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    got = load_latest(tmp_path)
    assert got is not None and got.step == 1 and float(got.net["w"][0, 0]) == 1.0
    # later saves neither pick it up nor count it when pruning
    save_checkpoint(tmp_path, tiny_state(2), keep=2)
    save_checkpoint(tmp_path, tiny_state(3), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    assert load_latest(tmp_path).step == 3  # type: ignore[union-attr]


def test_an_exception_during_save_leaves_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, tiny_state(1, value=1.0))
    real = checkpoint.save_file

    def fail_on_ema(tensors: dict, path: Path) -> None:  # type: ignore[type-arg]
        if Path(path).name == "ema.safetensors":
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_ema)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, tiny_state(2, value=2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001", LATEST]
    got = load_latest(tmp_path)
    assert got is not None and got.step == 1 and float(got.net["w"][0, 0]) == 1.0


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, tiny_state(4, value=1.0))
    save_checkpoint(tmp_path, tiny_state(4, value=2.0))
    got = load_latest(tmp_path)
    assert got is not None and float(got.net["w"][0, 0]) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004", LATEST]


def test_load_latest_without_checkpoints_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "does-not-exist") is None


def corrupt_state_json(path: Path) -> None:
    (path / "state.json").write_text("{not json")


def state_json_not_a_mapping(path: Path) -> None:
    (path / "state.json").write_text("[1, 2]")


def state_json_missing_key(path: Path) -> None:
    (path / "state.json").write_text('{"step": 1}')


def truncated_weights(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])


def garbage_state_tensors(path: Path) -> None:
    (path / "state.safetensors").write_bytes(b"\x00" * 7)


def missing_ema(path: Path) -> None:
    (path / "ema.safetensors").unlink()


def folder_gone(path: Path) -> None:
    shutil.rmtree(path)


@pytest.mark.parametrize("damage", [corrupt_state_json, state_json_not_a_mapping,
                                    state_json_missing_key, truncated_weights,
                                    garbage_state_tensors, missing_ema, folder_gone])
def test_unreadable_latest_checkpoint_is_an_input_error(
        tmp_path: Path, damage: Callable[[Path], None]) -> None:
    path = save_checkpoint(tmp_path, tiny_state(1))
    damage(path)
    with pytest.raises(InputError, match="latest checkpoint is unreadable") as info:
        load_latest(tmp_path)
    assert str(tmp_path) in str(info.value) and "delete the folder" in str(info.value)


@pytest.mark.parametrize("text", ["{oops", "[]", '{"step": 1}'])
def test_unreadable_latest_pointer_is_an_input_error(tmp_path: Path, text: str) -> None:
    save_checkpoint(tmp_path, tiny_state(1))
    (tmp_path / LATEST).write_text(text)
    with pytest.raises(InputError, match="latest checkpoint is unreadable"):
        load_latest(tmp_path)


def test_resaving_a_step_keeps_every_ckpt_folder_complete(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, tiny_state(1, value=1.0))
    save_checkpoint(tmp_path, tiny_state(2, value=2.0))
    save_checkpoint(tmp_path, tiny_state(2, value=3.0))  # the same step again
    assert float(load_latest(tmp_path).net["w"][0, 0]) == 3.0  # type: ignore[union-attr]
    assert not list(tmp_path.glob(".ckpt-*"))  # the replaced folder is cleaned up


def test_latest_pointing_at_a_moved_folder_falls_back_to_the_newest_complete(
        tmp_path: Path) -> None:
    # a kill between moving a re-saved step aside and renaming the new one in
    save_checkpoint(tmp_path, tiny_state(1, value=1.0), keep=3)
    save_checkpoint(tmp_path, tiny_state(2, value=2.0), keep=3)
    (tmp_path / "ckpt-00000002").rename(tmp_path / ".ckpt-00000002.old-cafe0000")
    got = load_latest(tmp_path)
    assert got is not None and got.step == 1 and float(got.net["w"][0, 0]) == 1.0


def test_a_kill_while_pruning_leaves_every_ckpt_folder_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old checkpoints are renamed out of the `ckpt-*` names before they are deleted:
    a kill half-way through deleting one leaves no partial `ckpt-*` folder that
    load_latest could fall back to."""
    for step in (1, 2):
        save_checkpoint(tmp_path, tiny_state(step), keep=2)

    def killed_half_way(path: Path, ignore_errors: bool = False) -> None:
        next(Path(path).iterdir()).unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, tiny_state(3), keep=2)  # prunes ckpt-1
    monkeypatch.undo()
    for folder in tmp_path.glob("ckpt-*"):
        assert {p.name for p in folder.iterdir()} == {
            "model.safetensors", "ema.safetensors", "state.safetensors", "state.json"}
    assert load_latest(tmp_path).step == 3
    save_checkpoint(tmp_path, tiny_state(4), keep=2)  # the next save clears the debris
    assert not list(tmp_path.glob(".ckpt-*"))
