"""Every pluggable list of choices, one table each: the names a config accepts,
with the line the CLI's help and the report use for each. The config's `Literal`
types sit next to their table (spelled out, for type checkers; a test checks each
equals its table), CLI `choices=` are read from the tables, and each
implementing module keys its implementations by the same names (a test checks
those too). Adding an accountant, a source kind, a sampler or a feature
extractor is one entry here plus its implementation.

Kept free of heavy imports: `dpsynth.config` reads it.
"""

from __future__ import annotations

from typing import Literal

# --------------------------------------------------------------------------- accountants
# (dpsynth.privacy.accounting)

ACCOUNTANTS = {
    "prv": "PRV: privacy random variables (Gopi, Lee & Wutschitz 2021), Opacus' accountant",
    "rdp": "RDP: Rényi differential privacy (Mironov 2017), Opacus' accountant",
}
AccountantKind = Literal["prv", "rdp"]

# --------------------------------------------------------------------------- per-example engines
# (dpsynth.privacy.dp_sgd.noisy_gradient)

PER_EXAMPLE = {
    "vmap": "torch.func vmap(grad): every example's gradient materialised (the reference)",
    "bookkeeping": "one forward and backward, norms per layer, the clipped sum from stored "
                   "activations (Bu et al. 2023)",
}
PerExampleKind = Literal["vmap", "bookkeeping"]

# --------------------------------------------------------------------------- training precisions
# (dpsynth.training.precision.autocast)

PRECISIONS = {
    "fp32": "float32 throughout (TF32 convolutions on GPUs, PyTorch's default)",
    "bf16": "bfloat16 autocast of the forward and backward; float32 weights, optimizer, "
            "per-example norms, clipping factors, sums and noise",
}
PrecisionKind = Literal["fp32", "bf16"]

# --------------------------------------------------------------------------- data sources
# (dpsynth.data.sources.load_source's readers)

SOURCE_KINDS = {
    "digits": "scikit-learn's 8x8 handwritten digits (embedded)",
    "printed-digits": "digits rendered from matplotlib's TrueType fonts (embedded)",
    "cifar10": "CIFAR-10, the python tarball (cifar-10-python.tar.gz)",
    "imagenet32": "downsampled ImageNet 32x32, the npz batches",
    "camelyon17": "Camelyon17-WILDS patches, the WILDS folder layout",
    "imagefolder": "one sub-folder of images per class",
    "npz": "an .npz with `images` (uint8 NHWC) and `labels`",
}
SourceKind = Literal["digits", "printed-digits", "cifar10", "imagenet32", "camelyon17",
                     "imagefolder", "npz"]
EMBEDDED_KINDS = ("digits", "printed-digits")  # built into dpsynth: they need no path

# --------------------------------------------------------------------------- samplers
# (dpsynth.diffusion.samplers.make_sampler)

SAMPLERS = {
    "ddpm": "DDPM ancestral sampling (Ho et al. 2020)",
    "ddim": "DDIM (Song et al. 2021); sample.eta = 0 is deterministic",
    "dpmsolver++": "DPM-Solver++ 2M (Lu et al. 2022), few steps",
}
SamplerKind = Literal["ddpm", "ddim", "dpmsolver++"]

# --------------------------------------------------------------------------- feature extractors
# (dpsynth.stages.fid)

EXTRACTORS = {
    "inception-v3-compat": "torch-fidelity's Inception-v3 (FID, KID: the standard scale)",
    "domain-cnn": "a CNN trained on the public split (distances fd_<data>_cnn, ...)",
}
ExtractorKind = Literal["inception-v3-compat", "domain-cnn"]
