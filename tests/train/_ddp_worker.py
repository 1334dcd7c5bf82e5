"""Run by torchrun in test_distributed.py: train a few iterations, dump this rank's parameters."""
import sys

import torch

from mexify.api import train
from mexify.train import trainer


def main():
    bundle, data, out, dump = sys.argv[1:5]
    torch.set_num_threads(1)
    seen = {}
    orig = trainer._Trainer._finish

    def spy(self, wall):
        seen["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return orig(self, wall)

    trainer._Trainer._finish = spy
    original_run = trainer._Trainer.run

    def run(self):
        rep = original_run(self)
        if not seen:
            seen["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        torch.save({"rank": self.info.rank, "world": self.info.world_size, "state": seen["model"],
                    "per_epoch": None}, dump.format(rank=self.info.rank))
        return rep

    trainer._Trainer.run = run
    train(bundle, data, overrides={"stage1_iters": 3, "stage2_iters": 2, "batch_size": 2, "crop_size": 48,
                                           "checkpoint_every": 2, "log_every": 1}, out=out, device="cpu")


if __name__ == "__main__":
    main()
