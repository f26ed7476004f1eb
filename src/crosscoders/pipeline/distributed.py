"""``crosscoders run`` under torchrun: rank 0 runs the experiment, every rank trains.

Rank 0 runs each stage as a single process would (organism, harvest, diff, report, the
stage records). The other ranks wait until rank 0 reaches the train stage; rank 0 then
tells them what to train (the store, both configs and the run directory) or that the stage
is up to date, and all ranks train together (:func:`crosscoders.train.train`). The others
exit after training. The wait uses its own gloo group with a long timeout, since rank 0
may harvest for hours first; a rank 0 that dies ends the wait at once with an error.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from crosscoders.errors import CrosscodersError
from crosscoders.train.distributed import DataParallel, PeerLost, resolve_parallel

#: how long the other ranks wait for rank 0 to finish the stages before training
WAIT_FOR_RANK0 = datetime.timedelta(days=7)


@dataclass
class Coordinator:
    """The ranks of a data-parallel ``crosscoders run`` and the group they talk over."""

    dp: DataParallel
    group: Any

    @property
    def is_main(self) -> bool:
        return self.dp.is_main

    def _send(self, message: dict | None) -> dict:
        box = [message]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except Exception as err:  # rank 0 stopped before it reached the train stage
            raise PeerLost(
                f"rank {self.dp.rank} of {self.dp.world_size}: rank 0 stopped before the "
                f"train stage ({str(err).strip().splitlines()[0][:120]}); see rank 0's error, "
                "fix it and run the same command again"
            ) from None
        return box[0]

    def announce_train(self, store: Path, crosscoder: dict, train: dict, run_dir: Path) -> None:
        """Rank 0: the train stage runs now; every rank joins it."""
        self._send({"train": True, "store": str(store), "crosscoder": crosscoder,
                    "train_config": train, "run_dir": str(run_dir)})

    def announce_skip(self) -> None:
        """Rank 0: the train stage is up to date; the other ranks can go."""
        self._send({"train": False})

    def follow(self) -> None:
        """Ranks > 0: wait for rank 0, train with it if it trains."""
        message = self._send(None)
        if not message["train"]:
            return
        from crosscoders import CrosscoderConfig, TrainConfig, train
        from crosscoders.store import ActivationStore

        store = ActivationStore.open(message["store"])
        train(CrosscoderConfig.from_dict(message["crosscoder"]), store,
              TrainConfig.from_dict(message["train_config"]), run_dir=message["run_dir"])

    def close(self) -> None:
        self.dp.close()


def coordinator_for(train_config) -> Coordinator | None:
    """A coordinator when torchrun started several processes to train data-parallel."""
    if resolve_parallel(train_config.parallel) != "data":
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    dp = DataParallel.from_env(train_config.device, train_config.dist_timeout_minutes)
    try:
        group = dist.new_group(backend="gloo", timeout=WAIT_FOR_RANK0)
    except Exception as err:
        dp.close()
        raise CrosscodersError(f"cannot set up the data-parallel processes ({err}); start "
                               "them all with the same torchrun command") from None
    return Coordinator(dp, group)
