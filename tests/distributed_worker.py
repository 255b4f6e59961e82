"""Entry point for the torchrun test: train like train_caption.py, then report every rank's parameter checksum.

Launched as ``ENTRY=tests/distributed_worker.py bash scripts/train.sh CONFIG KEY=VALUE ...`` with REPORT set to
the JSON file rank 0 writes.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import training  # noqa: E402
import utils  # noqa: E402
from train_caption import parse_args  # noqa: E402


def fail_on_rank_at_step(rank: int, step: int) -> None:
    """Make rank ``rank`` raise in its ``step``-th objective call, to test how the other ranks end."""
    import models

    calls = {"n": 0}
    original = models.CaptionObjective.__call__

    def failing(self, logits, targets):
        calls["n"] += 1
        if utils.get_rank() == rank and calls["n"] == step:
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        return original(self, logits, targets)

    models.CaptionObjective.__call__ = failing


def main():
    if os.environ.get("FAIL_RANK"):
        fail_on_rank_at_step(int(os.environ["FAIL_RANK"]), int(os.environ.get("FAIL_STEP", 2)))
    args = parse_args()
    config = training.load_config(args.config, args.opt)
    utils.setup_logging(config["output_dir"])
    _, captioner = training.run_training(training.resolve_data_paths(config))
    flat = torch.cat([p.detach().double().flatten() for p in captioner.parameters()])
    checksums = utils.all_gather_object([float(flat.sum()), float((flat * flat).sum())])
    if utils.is_main():
        Path(os.environ["REPORT"]).write_text(json.dumps({"world_size": utils.get_world_size(), "checksums": checksums}))
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
