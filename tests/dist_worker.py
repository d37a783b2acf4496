"""Run by tests/test_distributed.py under torchrun: train, then save each rank's weights.

    torchrun --nproc-per-node 2 tests/dist_worker.py MODE OUT_DIR CONFIG_JSON

MODE is "train", or "fail"/"hang" to make rank 1 raise or stop responding at step 3.
"""
import json
import sys
import time

import torch

from resnetkit.train import Trainer, build_config


def main() -> None:
    mode, out, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    real = Trainer.train_step

    def faulty(self, micro, n=None):
        if self.dist.rank == 1 and self.global_step == 2:
            if mode == "fail":
                raise RuntimeError("injected failure on rank 1 at step 3")
            time.sleep(3600)
        return real(self, micro, n)

    if mode != "train":
        Trainer.train_step = faulty
    t = Trainer(build_config(None, **cfg), quiet=True)
    t.fit()
    torch.save(t.model.state_dict(), f"{out}/rank{t.dist.rank}.pt")


if __name__ == "__main__":
    main()
