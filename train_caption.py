"""Fine-tune a BLIP captioner with the objective its YAML config names (MLE, SMILE, a mixture, an ablation).

    python train_caption.py --config configs/toy/smile.yaml                       # one process, CPU or GPU
    torchrun --nproc_per_node 8 train_caption.py --config configs/coco/smile.yaml # DDP
    bash scripts/train.sh configs/coco/smile.yaml --opt train.batch_size=16      # the same, via the wrapper

Each epoch: train, generate on val, score, keep checkpoint_latest.safetensors (also every train.checkpoint_every
steps) and checkpoint_best.safetensors (CIDEr + BLEU-4); at the end the best checkpoint is scored on test.
Everything lands in ``output_dir``; ``--resume`` continues a run that was stopped.
"""
import argparse
import sys

import training
import utils


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/default.yaml for all keys)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, dotted for nested keys; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoint_latest.safetensors (same as --opt resume=true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in output_dir and start over (same as --opt overwrite=true)")
    args = parser.parse_args(argv)
    args.opt += ["resume=true"] * args.resume + ["overwrite=true"] * args.overwrite
    return args


def main(argv=None) -> dict:
    """Returns the run summary (best validation metrics, test metrics of the best checkpoint)."""
    args = parse_args(argv)
    config = training.load_config(args.config, args.opt)
    utils.setup_logging(config["output_dir"])
    utils.configure_cpu_threads(config)  # before any heavy work: toy builds, the model
    try:
        summary, _ = training.run_training(config)
        return summary
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, training.USER_ERRORS))
