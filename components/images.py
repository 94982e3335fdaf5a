"""The container images the components run in, chosen when the pipeline is compiled.

`DPSYNTH_IMAGE` names the CUDA image (docker/Dockerfile's default target), used by
the GPU stages; `DPSYNTH_IMAGE_CPU` the CPU variant (several GB smaller), used by
the others. Defaults: the published images of this package's version. Set them
before `make pipeline` to use your registry, e.g.
`DPSYNTH_IMAGE=registry.example.com/dpsynth:0.1.0 make pipeline`.
"""

import os

import dpsynth

DEFAULT_IMAGE = f"ghcr.io/dpsynth/dpsynth:{dpsynth.__version__}"
GPU_IMAGE = os.environ.get("DPSYNTH_IMAGE") or DEFAULT_IMAGE
# `make image-cpu` tags the CPU variant `<tag>-cpu`
CPU_IMAGE = os.environ.get("DPSYNTH_IMAGE_CPU") or f"{GPU_IMAGE}-cpu"
