"""Run by tests/test_faults.py under torchrun --max-restarts: `resnetkit train ARGS`, where
the process of global rank KILL_RANK kills itself with SIGKILL after optimizer step KILL_STEP
of the first attempt (TORCHELASTIC_RESTART_COUNT 0), as a lost machine would."""
import os
import signal
import sys

from resnetkit.cli import main
from resnetkit.train import Trainer

real = Trainer.train_step


def dying(self, micro, n=None):
    out = real(self, micro, n)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and \
            self.dist.rank == int(os.environ["KILL_RANK"]) and \
            self.global_step + 1 == int(os.environ["KILL_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out


if os.environ.get("KILL_STEP"):
    Trainer.train_step = dying
sys.exit(main(sys.argv[1:]))
