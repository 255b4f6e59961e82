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

import engine  # noqa: E402
import utils  # noqa: E402
from train_caption import parse_args  # noqa: E402


def main():
    args = parse_args()
    config = engine.load_config(args.config, args.opt)
    utils.setup_logging(config["output_dir"])
    _, captioner = engine.run_training(engine.resolve_data_paths(config))
    flat = torch.cat([p.detach().double().flatten() for p in captioner.parameters()])
    checksums = utils.all_gather_object([float(flat.sum()), float((flat * flat).sum())])
    if utils.is_main():
        Path(os.environ["REPORT"]).write_text(json.dumps({"world_size": utils.get_world_size(), "checksums": checksums}))
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
