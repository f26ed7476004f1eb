"""One rank of a data-parallel training run, for tests/test_distributed.py.

``python ddp_worker.py SPEC_JSON`` with torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set: trains every job of the spec on planted data.
A CrosscodersError exits 2 with ``error: ...`` on stderr, as the CLI does.
"""

import datetime
import json
import sys

import torch
import torch.distributed as dist

from crosscoders import CrosscoderConfig, TrainConfig, train
from crosscoders.errors import CrosscodersError
from helpers import planted_acts


def main(spec: dict) -> int:
    torch.set_num_threads(1)
    if "own_bucket_numel" in spec:  # small test models: give W_enc and W_dec their buckets
        from crosscoders.train import distributed

        distributed.OWN_BUCKET_NUMEL = spec["own_bucket_numel"]
    acts, _ = planted_acts(n=spec.get("n_tokens", 4096))
    if len(spec["jobs"]) > 1:  # one process group for every job (train() reuses it)
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=1))
    try:
        for job in spec["jobs"]:
            cfg = CrosscoderConfig.from_dict(job["crosscoder"])
            train(cfg, acts, TrainConfig.from_dict(job["train"]), run_dir=job["run_dir"])
    except CrosscodersError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
