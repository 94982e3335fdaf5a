"""One torchrun worker of tests/training/test_data_parallel.py.

    ddp_worker.py CONFIG DATA OUT WHAT

WHAT: `pretrain` (to the end), `pretrain:K` (stop after K steps, as a killed run)
or `both` (pre-training, then DP fine-tuning of its model). Inputs under DATA
(public/, private/), outputs under OUT (pre/, dp/); the config file holds every
setting, the ledger folder included.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dpsynth import config
from dpsynth.stages import finetune, pretrain
from dpsynth.tracking import NullTracker


def main(cfg_path: str, data: str, out: str, what: str) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        force=True)  # an imported library may have configured it
    cfg, data_dir, out_dir = config.load(cfg_path), Path(data), Path(out)
    stop_after = int(what.split(":")[1]) if what.startswith("pretrain:") else None
    pretrain.run(cfg, public_dir=data_dir / "public", out_dir=out_dir / "pre",
                 tracker=NullTracker(), stop_after=stop_after)
    if what == "both":
        finetune.run(cfg, model_dir=out_dir / "pre", private_dir=data_dir / "private",
                     public_dir=data_dir / "public", out_dir=out_dir / "dp",
                     tracker=NullTracker())
    print(f"process group: {dist.get_backend() if dist.is_initialized() else None}")


if __name__ == "__main__":
    main(*sys.argv[1:])
