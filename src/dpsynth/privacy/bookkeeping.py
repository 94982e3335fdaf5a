"""Per-example clipping by book-keeping: one forward and one backward over the
B*K rows, the K copies of an example grouped as one (PRIVACY.md rules 2 and 3).

The reference engine (`per_example.py`) materialises every example's gradient
with `vmap(grad(...))`. This one never does for the whole net: hooks keep each
trainable layer's input activations a and output gradients g (Bu et al. 2023,
"Differentially private optimization on large model at small cost",
book-keeping), and layer by layer, as the backward reaches it, compute each
example's squared gradient norm, where example i's gradient is that of the
*mean* of its K copies' losses: the K rows of an example are one group, so
its weight gradient is sum over its K*T row-positions p of g_p a_p^T. That
norm is taken either in the ghost form ||sum_p g_p a_p^T||^2 =
sum_{p,q} (g_p . g_q)(a_p . a_q) (Li et al. 2022, "Large language models can be
strong differentially private learners", ghost clipping; Gram matrices of
(K*T)^2 entries) or by instantiating the layer's per-example gradient,
whichever takes fewer operations (`use_ghost`; Bu et al. 2023's mixed rule).
An instantiated gradient is kept where it is smaller than the rows it comes
from, and its rows freed; otherwise it is discarded. The clipped sum
sum_i min(1, C/||g_i||) g_i is then formed from the kept per-example gradients,
or from the kept activations and the row-rescaled output gradients: no second
backward, and the autograd pass computes no weight gradient at all (the
parameters are not its inputs). Per-example gradient memory is at most
B x parameters whatever K.

Precision: under `precision="bf16"` the forward and backward run in bfloat16
autocast; the hooks' tensors are then bf16 (a float32 input is cast before its
layer, so that one bf16 copy is kept). The Gram matrices are formed in float32
from them (exact products), instantiated per-example gradients are made in bf16
and kept in float32 (their norm and their share of the sum are taken from the
same numbers), and the norms, the clipping factors and the clipped sum are
float32; the sums recomputed from the rows are formed in float32 too. An
instantiated gradient that is not kept has its norm from bf16-rounded numbers
(2**-8 relative) and its share from the float32 rows: the factors clip to
C * (1 - 2**-6) to absorb that (`training.precision.BF16_CLIP_MARGIN`).

Where a norm and its example's share come from two computations (ghost norms,
gradients not kept), both are float32-exact: no TF32 on GPUs
(`training.precision.exact_float32`). Otherwise a sum formed in bf16 or TF32
moves with its own norm, and one record could move a large batch's sum by more
than C.

Supported trainable layers: Conv2d (groups=1, zero padding), Linear (inputs
[N, d] or [N, T, d]), GroupNorm (affine), Embedding, and Linear/Conv2d weights
with a LoRA adapter (`diffusion/lora.py`). Any other trainable parameter is
refused with an error naming its module: mis-clipping would be silent.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dpsynth.choices import PrecisionKind
from dpsynth.diffusion.lora import LowRankDelta
from dpsynth.diffusion.loss import DenoisingLoss
from dpsynth.errors import InputError
from dpsynth.training.precision import (BF16_CLIP_MARGIN, autocast, exact_float32,
                                       full_precision)

Grads = dict[str, torch.Tensor]
NormMode = Literal["auto", "ghost", "instantiate"]
Summer = Callable[[torch.Tensor], Grads]  # [b] clipping factors -> name -> clipped sum
SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
# roles of a layer's parameters, by their name under the layer
ROLES = {"weight": "weight", "bias": "bias", "parametrizations.weight.original": "weight",
         "parametrizations.weight.0.lora_A": "lora_A",
         "parametrizations.weight.0.lora_B": "lora_B"}


@dataclass
class Layer:
    """One trainable layer and what the hooks recorded of its calls.

    Attributes:
        name: the module's name in the net; module: the module.
        params: role ("weight", "bias", "lora_A", "lora_B") -> full name of each
            of its trainable parameters.
        calls: per forward call, [input, output gradient or None].
    """

    name: str
    module: nn.Module
    params: dict[str, str]
    calls: list[list] = field(default_factory=list)
    pending: int = 0


def base_type(module: nn.Module) -> type:
    """The layer class (a parametrized module's class is a generated subclass)."""
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


def _refuse(name: str, module: nn.Module, why: str) -> InputError:
    return InputError(
        f"per_example=bookkeeping cannot clip module {name!r} ({type(module).__name__}): "
        f"{why}; freeze its parameters (finetune.trainable) or use "
        "finetune.per_example=vmap")


def trainable_layers(net: nn.Module) -> list[Layer]:
    """The net's layers with trainable parameters, each checked to be supported.

    Raises:
        InputError: a trainable parameter whose module this engine cannot clip,
            naming the module and its type.
    """
    layers, claimed = [], set()
    for name, module in net.named_modules():
        # exact types only: a subclass may compute something else in its forward
        if type(module) not in SUPPORTED and not (parametrize.is_parametrized(module)
                                                  and base_type(module) in SUPPORTED):
            continue
        prefix = f"{name}." if name else ""
        params = {}
        for local, p in module.named_parameters():
            if not p.requires_grad:
                continue  # frozen: skipped, as in the vmap engine
            if local not in ROLES:
                raise _refuse(name, module, f"unsupported parameter {local!r}")
            params[ROLES[local]] = prefix + local
        if not params:
            continue
        _check_layer(name, module)
        claimed.update(params.values())
        layers.append(Layer(name, module, params))
    modules = dict(net.named_modules())
    for pname, p in net.named_parameters():
        if p.requires_grad and pname not in claimed:
            owner = pname.rpartition(".")[0]
            while owner not in modules:
                owner = owner.rpartition(".")[0]
            raise _refuse(owner, modules[owner], f"trainable parameter {pname!r} of an "
                          "unsupported layer type (supported: Conv2d, Linear, GroupNorm, "
                          "Embedding, LoRA adapters)")
    return layers


def _check_layer(name: str, m: nn.Module) -> None:
    """Refuse the configurations of a supported type that the rules below do not cover."""
    if parametrize.is_parametrized(m):
        plist = m.parametrizations
        if (list(plist.keys()) != ["weight"] or len(plist.weight) != 1
                or not isinstance(plist.weight[0], LowRankDelta)):
            raise _refuse(name, m, "only a single LoRA adapter (LowRankDelta) on the "
                          "weight is supported as a parametrization")
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                     or isinstance(m.padding, str)):
        raise _refuse(name, m, f"only groups=1, zero padding given as integers are "
                      f"supported, not groups={m.groups}, padding={m.padding!r}, "
                      f"padding_mode={m.padding_mode!r}")
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq
                                        or m.sparse):
        raise _refuse(name, m, "max_norm, scale_grad_by_freq and sparse are not supported")


def use_ghost(positions: int, d_in: int, d_out: int) -> bool:
    """Ghost norm where it takes fewer operations than instantiating: P^2 (d_in + d_out)
    for the two [P, P] Gram matrices against P d_in d_out for the [d_out, d_in]
    per-example gradient (Bu et al. 2023, Sec. 3.2). Then P < min(d_in, d_out), so
    the Grams are the smaller in memory too. Measured on the digits UNet (CPU, B=16,
    K=4): 1.84x the non-private forward+backward with this rule, 2.06x with Bu et
    al.'s memory rule 2 P^2 < d_in d_out, 1.99x instantiating every layer."""
    return positions * (d_in + d_out) < d_in * d_out


def _row_scale(c: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """[b] example factors -> broadcastable over the B*K rows of `like`."""
    return c.repeat_interleave(k).view(-1, *[1] * (like.ndim - 1))


def _linear_or_conv(layer: Layer, calls: list, b: int, k: int, mode: NormMode
                    ) -> tuple[torch.Tensor, Summer]:
    """Linear and Conv2d, with or without a LoRA adapter."""
    m, roles = layer.module, layer.params
    conv = isinstance(m, nn.Conv2d)
    d_out, d_in = m.weight.shape[0], m.weight.shape[1:].numel()
    p = sum(g.numel() for _, g in calls) // (b * d_out)  # K*T positions per example
    lora = parametrize.is_parametrized(m)
    if lora:
        delta = m.parametrizations.weight[0]
        lora_a, lora_b, s = delta.lora_A.detach(), delta.lora_B.detach(), delta.scale
    norm2 = torch.zeros(b, dtype=torch.float32, device=calls[0][1].device)
    kept: dict[str, torch.Tensor] = {}  # role -> per-example gradients [b, *shape]
    if mode == "ghost" or (mode == "auto" and use_ghost(p, d_in, d_out)):
        # float32 Grams (from bf16 rows: exact products): the norm is a sum of
        # (K*T)^2 signed terms, where bf16 rounding would not be relative to it
        pos = [_positions(m, a.float(), g.float(), b) for a, g in calls]
        a_pos, g_pos = (torch.cat(x, 1) if len(pos) > 1 else x[0] for x in zip(*pos))
        factors = []
        if lora and "lora_B" in roles:  # d/dB = s sum_p g_p (A a_p)^T
            factors.append((a_pos @ lora_a.T, s * g_pos))
        if lora and "lora_A" in roles:  # d/dA = s sum_p (B^T g_p) a_p^T
            factors.append((a_pos, s * (g_pos @ lora_b)))
        if "weight" in roles:
            factors.append((a_pos, g_pos))
        with exact_float32():  # the summer below recomputes the share in float32
            for fa, fg in factors:  # Li et al. 2022, Sec. 4: ||G^T A||^2 = <A A^T, G G^T>
                norm2 += (torch.bmm(fa, fa.mT) * torch.bmm(fg, fg.mT)).sum((1, 2))
        del pos, a_pos, g_pos, factors
    elif roles.keys() - {"bias"}:
        # [b, d_out, d_in] in float32 (made in the rows' precision). Kept, the norm
        # and the share of the sum come from the same numbers; not kept (larger than
        # the rows), the share is recomputed from the rows in float32 by the summer,
        # so these are made float32-exact too (no TF32; bf16 rows are exact in it)
        raw_size = sum(a.numel() + g.numel() for a, g in calls)
        rank = lora_a.shape[0] if lora else 0
        size = {"weight": d_out * d_in, "lora_B": d_out * rank, "lora_A": rank * d_in}
        # keep a per-example gradient only where it is smaller than the rows it
        # would otherwise be recomputed from (Bu et al. 2023's book-keeping trade)
        keep = {r for r in roles.keys() - {"bias"} if b * size[r] <= raw_size}
        with exact_float32() if keep != roles.keys() - {"bias"} else nullcontext():
            w = _instantiate(m, *calls[0], b, k).float()
            for a, g in calls[1:]:  # a module called more than once: its calls add up
                w += _instantiate(m, a, g, b, k).float()
        if "weight" in roles:
            kept["weight"] = w
        if lora and "lora_B" in roles:
            kept["lora_B"] = s * w @ lora_a.T
        if lora and "lora_A" in roles:
            kept["lora_A"] = s * lora_b.T @ w
        del w
        for v in kept.values():
            norm2 += _sq_norms(v)
        kept = {r: v for r, v in kept.items() if r in keep}
    if "bias" in roles:
        kept["bias"] = _bias_grad(calls[0][1], b, k)
        for _, g in calls[1:]:
            kept["bias"] += _bias_grad(g, b, k)
        norm2 += _sq_norms(kept["bias"])
    rows = calls if len(kept) < len(roles) else []  # else: free them now

    def summer(c: torch.Tensor) -> Grads:
        out = {roles[r]: _weighted_sum(c, w) for r, w in kept.items()}
        if rows:
            total = 0
            for a, g in rows:  # sum_i c_i g_i = the weight gradient of the rescaled rows
                # float32-exact from the (bf16) rows: a sum rounded to bf16 (or from
                # TF32-rounded c_i g) would move by up to 2**-8 (2**-11) of its own
                # norm, so one record could move it by more than C in a large batch
                # (tests/privacy/test_bookkeeping.py); `clipped_sum` runs this
                # under exact_float32
                a, g = a.float(), g.float() * _row_scale(c, k, g)
                if conv:
                    part = torch.nn.grad.conv2d_weight(
                        a, m.weight.shape, g, m.stride, m.padding, m.dilation, m.groups)
                else:
                    part = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
                total = total + part
            flat = total.reshape(total.shape[0], -1)
            if "weight" in roles and "weight" not in kept:
                out[roles["weight"]] = total
            if "lora_B" in roles and "lora_B" not in kept:
                out[roles["lora_B"]] = s * flat @ lora_a.T
            if "lora_A" in roles and "lora_A" not in kept:
                out[roles["lora_A"]] = s * lora_b.T @ flat
        return out

    return norm2, summer


def _positions(m: nn.Module, a: torch.Tensor, g: torch.Tensor, b: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, K*T, d_in] inputs and [b, K*T, d_out] output gradients of one call: the
    K copies' T positions of each example grouped (a conv by im2col: a Linear over
    its C_in*kh*kw patches)."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
        return cols.mT.reshape(b, -1, cols.shape[1]), g.flatten(2).mT.reshape(b, -1, g.shape[1])
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


def _instantiate(m: nn.Module, a: torch.Tensor, g: torch.Tensor, b: int, k: int
                 ) -> torch.Tensor:
    """[b, d_out, d_in] each example's weight gradient from one call (summed over
    its K copies and T positions)."""
    if isinstance(m, nn.Conv2d):
        # the examples as the groups of a grouped convolution, the K copies as its
        # batch: one weight-gradient kernel, no im2col (Rochette et al. 2019). im2col
        # and a batched matmul instead: 2.1x slower on an H200 at 32 x K=32 in bf16
        # (0.79 -> 1.66 s), 18% more memory (docs/scale.md)
        c_in, c_out = a.shape[1], g.shape[1]
        w = torch.nn.grad.conv2d_weight(_as_groups(a, b, k), (b * c_out, c_in, *m.kernel_size),
                                        _as_groups(g, b, k), m.stride, m.padding, m.dilation,
                                        groups=b)
        return w.reshape(b, c_out, -1)
    return torch.bmm(g.reshape(b, -1, g.shape[-1]).mT, a.reshape(b, -1, a.shape[-1]))


def _as_groups(t: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """[b*K, C, H, W] rows -> [K, b*C, H, W]: example i's channels as group i, in
    the rows' memory format (channels-last rows give channels-last groups, so that
    cuDNN needs no layout transposes)."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        nhwc = t.permute(0, 2, 3, 1).reshape(b, k, h, w, c)  # a view of the NHWC memory
        return nhwc.permute(1, 2, 3, 0, 4).reshape(k, h, w, b * c).permute(0, 3, 1, 2)
    return t.reshape(b, k, c, h, w).transpose(0, 1).reshape(k, b * c, h, w)


def _sq_norms(v: torch.Tensor) -> torch.Tensor:
    """[b] squared norms of [b, ...] per-example gradients (a norm reduction:
    `linalg.vecdot` materialises the products, 10x slower on CPU)."""
    return torch.linalg.vector_norm(v.reshape(len(v), -1), dim=1).square()


def _weighted_sum(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_i c_i v_i of [b, ...] per-example gradients, shape [...]."""
    return (c @ v.reshape(len(v), -1)).view(v.shape[1:])


def _bias_grad(g: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """[b, d_out] each example's bias gradient: its output gradients summed."""
    if g.ndim == 4:  # conv: [N, C_out, H, W]
        return g.sum((2, 3), dtype=torch.float32).view(b, k, -1).sum(1)
    return g.reshape(b, -1, g.shape[-1]).sum(1, dtype=torch.float32)


def _group_norm(layer: Layer, calls: list, b: int, k: int, mode: NormMode
                ) -> tuple[torch.Tensor, Summer]:
    """GroupNorm's affine weight and bias: per example, sum over its rows and
    positions of g * x_hat (weight) and of g (bias); C numbers each, instantiated."""
    m, roles = layer.module, layer.params
    per = {"weight": 0, "bias": 0}
    for a, g in calls:
        g4 = g.float().reshape(b, k, m.num_channels, -1)
        if "weight" in roles:
            x_hat = F.group_norm(a.float(), m.num_groups, eps=m.eps).reshape(g4.shape)
            per["weight"] = per["weight"] + (g4 * x_hat).sum((1, 3))
        per["bias"] = per["bias"] + g4.sum((1, 3))
    kept = {r: per[r] for r in roles}
    norm2 = sum(_sq_norms(w) for w in kept.values())
    return norm2, lambda c: {roles[r]: c @ w for r, w in kept.items()}


def _embedding(layer: Layer, calls: list, b: int, k: int, mode: NormMode
               ) -> tuple[torch.Tensor, Summer]:
    """Embedding: example i's gradient scatters its rows' output gradients onto
    their indices; its norm by the ghost form (same index <=> a_p . a_q = 1)."""
    m, name = layer.module, layer.params["weight"]
    idx = torch.cat([a.reshape(b, -1) for a, _ in calls], 1)  # [b, P]
    g = torch.cat([g.float().reshape(b, -1, m.embedding_dim) for _, g in calls], 1)  # [b, P, d]
    if m.padding_idx is not None:  # the padding row gets no gradient
        g = g * (idx != m.padding_idx).unsqueeze(-1)
    p = idx.shape[1]
    if mode == "ghost" or (mode == "auto" and use_ghost(p, m.num_embeddings, m.embedding_dim)):
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
        norm2 = (same * torch.bmm(g, g.mT)).sum((1, 2))
    else:
        w = torch.bmm(F.one_hot(idx, m.num_embeddings).to(g.dtype).mT, g)
        norm2 = w.pow(2).sum((1, 2))

    def summer(c: torch.Tensor) -> Grads:
        scaled = (g * c.view(-1, 1, 1)).reshape(-1, m.embedding_dim)
        return {name: torch.zeros_like(m.weight).index_add_(0, idx.reshape(-1), scaled)}

    return norm2, summer


RULES = {nn.Conv2d: _linear_or_conv, nn.Linear: _linear_or_conv, nn.GroupNorm: _group_norm,
         nn.Embedding: _embedding}


class Tape:
    """The hooks' state during one forward and backward over the B*K rows."""

    def __init__(self, layers: list[Layer], b: int, k: int, mode: NormMode,
                 device: torch.device) -> None:
        self.layers, self.b, self.k, self.mode, self.device = layers, b, k, mode, device
        self.roots: list[torch.Tensor] = []  # outputs of layers whose input needs no grad
        self.norm2: torch.Tensor | float = 0.0
        self.summers: list[Summer] = []

    def forward_hook(self, layer: Layer) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            a = inputs[0]
            if a.shape[0] != self.b * self.k:  # rows must be the examples' copies
                raise _refuse(layer.name, module, f"it was called on {a.shape[0]} rows, not "
                              f"the {self.b}x{self.k} copies, so its gradient cannot be "
                              "split by example")
            call = [a.detach(), None]
            layer.calls.append(call)
            layer.pending += 1
            if not a.requires_grad:  # the backward must reach this branch
                self.roots.append(output)
            # a tensor hook fires once, with the gradient summed over all of the
            # output's uses (and w.r.t. its value before any later in-place change)
            output.register_hook(lambda g: self.on_grad(layer, call, g))
        return hook

    def on_grad(self, layer: Layer, call: list, g: torch.Tensor) -> None:
        call[1] = g.detach()
        layer.pending -= 1
        if layer.pending == 0:  # every call of the layer has its gradient: norm it now
            self.process(layer)

    def process(self, layer: Layer) -> None:
        calls = [(a, g) for a, g in layer.calls if g is not None]
        layer.calls, layer.pending = [], -1
        if not calls:
            return  # no output reached the loss: a zero gradient
        if isinstance(layer.module, (nn.Conv2d, nn.Linear)):  # autocast: bf16 g, a maybe not
            calls = [(a.to(g.dtype), g) for a, g in calls]
        # runs inside the backward, hence inside the caller's autocast: off here, so
        # that the float32 parts stay float32
        with torch.no_grad(), full_precision(self.device):
            norm2, summer = RULES[base_type(layer.module)](layer, calls, self.b, self.k,
                                                          self.mode)
        if isinstance(self.norm2, torch.Tensor):
            self.norm2 += norm2
        else:
            self.norm2 = norm2
        self.summers.append(summer)

    def finish(self) -> None:
        """Layers some of whose calls got no gradient (unused outputs)."""
        for layer in self.layers:
            if layer.pending > 0:
                self.process(layer)


def example_losses(net: nn.Module, loss: DenoisingLoss, x0: torch.Tensor,
                   labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """([b*K] the rows' losses, [b] each example's K-averaged loss), in float32 and
    differentiable; x0 [b, K, C, H, W] as `clipped_sum` takes it. Private values:
    never logged (tests/test_no_egress.py watches them, as vmap's)."""
    b, k = x0.shape[:2]
    rows = loss.per_example(net, x0.flatten(0, 1), labels.flatten(), t.flatten(),
                            noise.flatten(0, 1)).float()
    return rows, rows.view(b, k).mean(1)


def _bf16_input(module: nn.Module, inputs: tuple) -> tuple | None:
    """Cast a float32 input to bfloat16 before a Conv2d or Linear under autocast.

    Autocast would make the same cast inside the layer, where the bf16 copy is the
    one autograd saves; the hooks would keep the float32 original besides it for
    the norms and the clipped sum (and cast it again). Cast here, the layer, autograd
    and the hooks share one bf16 tensor: the kept rows take half the memory and the
    forward computes bitwise the same."""
    a = inputs[0]
    if (a.dtype == torch.float32 and torch.is_grad_enabled()
            and torch.is_autocast_enabled(a.device.type)):
        return (a.to(torch.bfloat16), *inputs[1:])
    return None


def clipped_sum(net: nn.Module, loss: DenoisingLoss, x0: torch.Tensor, labels: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor, max_grad_norm: float, *,
                mode: NormMode = "auto", precision: PrecisionKind = "fp32"
                ) -> tuple[Grads, torch.Tensor]:
    """Sum over examples of each K-averaged gradient clipped to norm <= C.

    The same quantity as `per_example.clipped_sum(per_example_grads(...))`, by
    one forward and one backward over the B*K rows.

    Args:
        x0: [b, K, C, H, W] the K (augmented) copies of each example.
        labels: [b, K] labels of the copies (after label dropout).
        t: [b, K] timesteps; noise: [b, K, C, H, W].
        max_grad_norm: C.
        mode: "auto" picks ghost or instantiation per layer (`use_ghost`);
            "ghost" / "instantiate" force one (for tests and benchmarks).
        precision: "bf16": the forward and backward under bfloat16 autocast,
            the factors clipping to C * (1 - 2**-6) (module docstring).

    Returns:
        (name -> summed clipped gradient for each trainable parameter, in
        `named_parameters` order; [b] pre-clipping norms).
    """
    b, k = x0.shape[:2]
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if b == 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}, x0.new_zeros(0)
    layers = trainable_layers(net)
    tape = Tape(layers, b, k, mode, x0.device)
    handles = [layer.module.register_forward_hook(tape.forward_hook(layer))
               for layer in layers]
    if precision == "bf16":
        handles += [layer.module.register_forward_pre_hook(_bf16_input) for layer in layers
                    if base_type(layer.module) in (nn.Conv2d, nn.Linear)]
    try:
        with torch.enable_grad(), autocast(precision, x0.device):
            rows, losses = example_losses(net, loss, x0, labels, t, noise)
            # the backward of sum_i mean_k loss_ik: each row's output gradients carry
            # the 1/K, so summing an example's rows gives its K-averaged gradient
            total = losses.sum()
            roots, tape.roots = tape.roots, []
            # gradients w.r.t. the branch roots' outputs only: the engine then runs
            # every layer's input-gradient, but no parameter gradient (that is the
            # clipped sum's job below)
            torch.autograd.grad(total, roots, allow_unused=True)
            del roots, total, rows, losses
        tape.finish()
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.calls, layer.pending = [], 0
    norm2 = torch.as_tensor(tape.norm2, dtype=torch.float32, device=x0.device).expand(b)
    norms = norm2.clamp(min=0).sqrt()
    bound = max_grad_norm * (1 - BF16_CLIP_MARGIN) if precision == "bf16" else max_grad_norm
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)  # as per_example.clipped_sum
    summed: Grads = {}
    with torch.no_grad(), exact_float32():  # the sums in IEEE float32, as the norms
        for summer in tape.summers:
            summed.update(summer(factor))
    return {n: summed[n].reshape(p.shape) if n in summed else torch.zeros_like(p)
            for n, p in params.items()}, norms
