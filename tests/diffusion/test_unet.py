"""The denoiser: GroupNorm only, per-example independent, class-conditional,
and saved/loaded as safetensors without loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from dpsynth.config import ModelConfig
from dpsynth.diffusion.unet import (CONFIG, EMA_WEIGHTS, WEIGHTS, UNetSpec, build_unet,
                                    load_model, save_model)
from dpsynth.errors import InputError


def forward(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
            y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x, t, class_labels=y).sample


def inputs(b: int, c: int = 1, size: int = 8, seed: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, size, size, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, 3, (b,), generator=g))


@pytest.mark.parametrize("model", [
    ModelConfig(),  # the default model, as pretrain builds it
    ModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(0, 1)),
])
def test_group_norm_only_never_batch_norm(model: ModelConfig) -> None:
    net = build_unet(UNetSpec(8, 1, 10, model))
    kinds = {type(m) for m in net.modules()}
    assert not any(issubclass(k, torch.nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert torch.nn.GroupNorm in kinds
    # every GroupNorm uses the configured number of groups
    groups = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {model.norm_num_groups}


def test_architecture_follows_the_config(tiny_net: UNet2DModel) -> None:
    assert [type(b).__name__ for b in tiny_net.down_blocks] == ["DownBlock2D", "AttnDownBlock2D"]
    assert [type(b).__name__ for b in tiny_net.up_blocks] == ["AttnUpBlock2D", "UpBlock2D"]
    assert tiny_net.class_embedding.num_embeddings == 4  # 3 classes + the null label


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input_shape(channels: int) -> None:
    spec = UNetSpec(8, channels, 3, ModelConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                                attention_levels=()))
    net = build_unet(spec).eval()
    x, t, y = inputs(5, c=channels)
    out = forward(net, x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_examples_do_not_interact(tiny_net: UNet2DModel) -> None:
    # what DP-SGD relies on: example i's output does not depend on the rest of the batch
    x, t, y = inputs(6)
    batch = forward(tiny_net, x, t, y)
    single = torch.cat([forward(tiny_net, x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-4)


def test_class_and_timestep_condition_the_output(tiny_net: UNet2DModel,
                                                 tiny_spec: UNetSpec) -> None:
    x, t, _ = inputs(4)
    outs = [forward(tiny_net, x, t, torch.full((4,), k)) for k in range(4)]
    null = tiny_spec.null_label
    assert null == 3
    for a in range(4):
        for b in range(a + 1, 4):
            assert (outs[a] - outs[b]).abs().max() > 1e-4, (a, b)
    assert (forward(tiny_net, x, t + 1, torch.zeros(4, dtype=torch.long)) - outs[0]).abs().max() \
        > 1e-6
    with pytest.raises(IndexError):
        forward(tiny_net, x, t, torch.full((4,), null + 1))


def test_image_size_not_divisible_is_an_input_error() -> None:
    spec = UNetSpec(6, 1, 3, ModelConfig(block_out_channels=(8, 8, 8), norm_num_groups=4,
                                         attention_levels=()))
    with pytest.raises(InputError, match=r"data.image_size=6 must be divisible by .*=4"):
        build_unet(spec)


def test_spec_json_round_trip(tiny_spec: UNetSpec) -> None:
    raw = json.loads(json.dumps(tiny_spec.to_json()))
    assert UNetSpec.from_json(raw) == tiny_spec


def perturbed_copy(net: UNet2DModel, tiny_spec: UNetSpec) -> UNet2DModel:
    other = build_unet(tiny_spec).eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    return other


def test_save_load_round_trip_selects_ema_or_raw(tmp_path: Path, tiny_net: UNet2DModel,
                                                 tiny_spec: UNetSpec) -> None:
    ema = perturbed_copy(tiny_net, tiny_spec)
    save_model(tmp_path, tiny_spec, tiny_net, ema, extra={"classes": ["a", "b", "c"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, WEIGHTS, EMA_WEIGHTS])
    x, t, y = inputs(3)
    want_raw, want_ema = forward(tiny_net, x, t, y), forward(ema, x, t, y)
    assert not torch.equal(want_raw, want_ema)

    spec, got_ema, raw = load_model(tmp_path)  # EMA by default
    assert spec == tiny_spec
    assert raw["classes"] == ["a", "b", "c"] and raw["unet"] == tiny_spec.to_json()
    assert not got_ema.training
    assert torch.equal(forward(got_ema, x, t, y), want_ema)
    for k, v in ema.state_dict().items():
        assert torch.equal(got_ema.state_dict()[k], v), k

    _, got_raw, _ = load_model(tmp_path, use_ema=False)
    assert torch.equal(forward(got_raw, x, t, y), want_raw)


def test_without_ema_the_raw_weights_load(tmp_path: Path, tiny_net: UNet2DModel,
                                          tiny_spec: UNetSpec) -> None:
    save_model(tmp_path, tiny_spec, tiny_net)
    assert not (tmp_path / EMA_WEIGHTS).exists()
    _, net, _ = load_model(tmp_path, use_ema=True)
    x, t, y = inputs(2)
    assert torch.equal(forward(net, x, t, y), forward(tiny_net, x, t, y))


def test_weights_are_safetensors_not_pickle(tmp_path: Path, tiny_net: UNet2DModel,
                                            tiny_spec: UNetSpec) -> None:
    save_model(tmp_path, tiny_spec, tiny_net)
    head = (tmp_path / WEIGHTS).read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")  # pickle / torch zip
    header_len = int.from_bytes(head[:8], "little")
    header = json.loads((tmp_path / WEIGHTS).read_bytes()[8:8 + header_len])
    assert set(header) - {"__metadata__"} == set(tiny_net.state_dict())


def test_missing_config_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"{CONFIG}: no model config"):
        load_model(tmp_path)


@pytest.mark.parametrize("text", ["{half", "[]", '{"classes": []}',
                                  '{"unet": {"image_size": 8}}'])
def test_bad_config_json_is_an_input_error(tmp_path: Path, text: str) -> None:
    (tmp_path / CONFIG).write_text(text)
    with pytest.raises(InputError, match=f"{CONFIG}: not a valid model config"):
        load_model(tmp_path)


def test_missing_weights_are_an_input_error(tmp_path: Path, tiny_net: UNet2DModel,
                                            tiny_spec: UNetSpec) -> None:
    save_model(tmp_path, tiny_spec, tiny_net)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(InputError, match=f"{tmp_path}: no {WEIGHTS} .*dpsynth pretrain"):
        load_model(tmp_path)


class _Payload:
    """Unpickling this creates the file `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


@pytest.mark.parametrize("name", [WEIGHTS, "pytorch_model.bin"])
def test_pickled_weights_are_refused_unread(tmp_path: Path, tiny_net: UNet2DModel,
                                            tiny_spec: UNetSpec, name: str) -> None:
    save_model(tmp_path, tiny_spec, tiny_net)
    (tmp_path / WEIGHTS).unlink()
    marker = tmp_path / "marker"
    torch.save({"conv_in.weight": _Payload(str(marker))}, tmp_path / name)
    with pytest.raises(InputError, match="never unpickled") as info:
        load_model(tmp_path)
    assert name in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", [WEIGHTS, EMA_WEIGHTS])
def test_truncated_weights_are_an_input_error(tmp_path: Path, tiny_net: UNet2DModel,
                                              tiny_spec: UNetSpec, name: str) -> None:
    save_model(tmp_path, tiny_spec, tiny_net, tiny_net)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=f"{name}: cannot load weights"):
        load_model(tmp_path, use_ema=name == EMA_WEIGHTS)


def test_weights_of_another_architecture_are_an_input_error(
        tmp_path: Path, tiny_net: UNet2DModel, tiny_spec: UNetSpec) -> None:
    save_model(tmp_path, tiny_spec, tiny_net)
    raw = json.loads((tmp_path / CONFIG).read_text())
    raw["unet"]["num_classes"] = 5  # class embedding no longer matches
    (tmp_path / CONFIG).write_text(json.dumps(raw))
    with pytest.raises(InputError, match="cannot load weights"):
        load_model(tmp_path)


def test_with_classes_keeps_every_weight_but_the_class_embedding() -> None:
    from dpsynth.diffusion.unet import with_classes

    spec = UNetSpec(8, 1, 1000, ModelConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                             attention_levels=(1,)))
    net = build_unet(spec)
    new_spec, new = with_classes(spec, net, 10, seed=0)
    assert new_spec.num_classes == 10 and new_spec.null_label == 10
    old_state, new_state = net.state_dict(), new.state_dict()
    assert new_state["class_embedding.weight"].shape[0] == 11  # 10 classes + null
    for name, value in old_state.items():
        if not name.startswith("class_embedding."):
            assert torch.equal(new_state[name], value), name
    again = with_classes(spec, net, 10, seed=0)[1].state_dict()["class_embedding.weight"]
    assert torch.equal(again, new_state["class_embedding.weight"])  # seeded
