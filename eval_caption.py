"""Evaluate captions: generate with a checkpoint and score them, or score an existing results file.

    # generate on eval.split with model.pretrained (or --checkpoint), then score eval.metrics
    python eval_caption.py --config configs/toy/smile.yaml --checkpoint runs/toy/smile/checkpoint_best.safetensors
    torchrun --nproc_per_node 8 eval_caption.py --config configs/coco/eval_released.yaml

    # score captions from any system, no captioning model involved
    python eval_caption.py --results RESULTS.json --annotations GT_COCO.json [--images-root DIR] \\
        [--metrics coco,length,diversity,retrieval,clipscore,ppl] [--clip-model ID_OR_DIR] [--ppl-model ID_OR_DIR] \\
        [--out metrics.json] [--length-plot lengths.png]

    # CHAIR object hallucination (COCO): --instances is datasets/coco/annotations/instances_val2014.json
    python eval_caption.py --results R.json --annotations GT.json --metrics chair --instances INST.json --out M.json

    # FineCapEval: the GT comes from the CSV (no --annotations); image_id is the CSV's `image` file name
    python eval_caption.py --results R.json --finecapeval FineCapEval.csv --metrics coco,finecapeval --out M.json

Both write a histogram of the caption lengths as a PNG after the metrics (a plot that fails is only a warning):
<output_dir>/eval_<split>_caption_lengths.png, or for --results X_results.json, X_caption_lengths.png in the
folder of --out (default: of the results file).
"""
import argparse
import json
import sys
from pathlib import Path

import training
import utils
from metrics.clip_metrics import CLIP_LONG_TEXT
from metrics.registry import ALL_METRICS, DEFAULT_METRICS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_mode = parser.add_argument_group("generate and score (needs --config)")
    model_mode.add_argument("--config", help="experiment YAML")
    model_mode.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="config override")
    model_mode.add_argument("--checkpoint", help="weights to evaluate (default: model.pretrained)")
    model_mode.add_argument("--split", choices=["val", "test"], help="default: eval.split")
    file_mode = parser.add_argument_group("score a results file (needs --results and --annotations)")
    file_mode.add_argument("--results", help='JSON list of {"image_id", "caption"}')
    file_mode.add_argument("--annotations", help="COCO-format caption ground truth")
    file_mode.add_argument("--finecapeval", metavar="CSV", help="FineCapEval.csv: for --metrics finecapeval, and "
                           "the COCO GT (its caption column) when --annotations is not given")
    file_mode.add_argument("--images-root", help="folder holding the GT's file_name paths (image metrics)")
    file_mode.add_argument("--instances", metavar="INSTANCES.json", help="COCO instances_{train,val}2014.json, "
                           "for --metrics chair / chair_corrected (object hallucination)")
    file_mode.add_argument("--metrics", help=f"comma-separated metric groups from {', '.join(ALL_METRICS)} (default: "
                           f"the paper's, {','.join(DEFAULT_METRICS)}; retrieval and clipscore need --images-root and "
                           "share one CLIP pass over the images)")
    file_mode.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    file_mode.add_argument("--ppl-model", default="gpt2")
    file_mode.add_argument("--clip-long-text", choices=CLIP_LONG_TEXT, default="truncate",
                           help="a caption longer than the CLIP's text window: truncate (the paper's metrics) or "
                                "chunks (sentences or pieces within the window, their embeddings averaged; "
                                "docs/evaluation.md)")
    file_mode.add_argument("--out", help="write the metrics JSON here")
    file_mode.add_argument("--length-plot", help="write the caption-length histogram (PNG) here instead")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.results):
        parser.error("give either --config (generate and score) or --results with --annotations (score a file)")
    if args.results and not (args.annotations or args.finecapeval):
        parser.error("--results needs --annotations (or --finecapeval)")
    if args.length_plot and not args.results:
        parser.error("--length-plot goes with --results; with --config the plot is <output_dir>/eval_<split>_"
                     "caption_lengths.png")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.results:
        from metrics.plots import length_plot_path, plot_caption_lengths_or_warn
        from metrics.suite import MetricOptions, score_results_file

        utils.setup_logging()
        groups = [name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None
        training.check_scoring_inputs(  # before any scoring starts
            {"--results": args.results, "--annotations": args.annotations, "--finecapeval": args.finecapeval,
             "--instances": args.instances}, args.images_root, groups, args.clip_model, args.ppl_model)
        options = MetricOptions(images_root=args.images_root, clip_model=args.clip_model, ppl_model=args.ppl_model,
                                finecapeval=args.finecapeval, instances=args.instances,
                                clip_long_text=args.clip_long_text)
        metrics = score_results_file(args.results, args.annotations, groups, options, out=args.out)
        print(json.dumps(metrics, indent=2))
        plot = args.length_plot or length_plot_path(args.results, Path(args.out).parent if args.out else None)
        plot_caption_lengths_or_warn(args.results, plot, run=Path(args.results).stem)
        return metrics
    config = training.load_config(args.config, args.opt)
    # Its own log file: evaluating into a training run's folder adds only eval_* files there.
    utils.setup_logging(config["output_dir"], log_name=f"eval_{args.split or config['eval']['split']}.log")
    utils.configure_cpu_threads(config)  # before any heavy work: toy builds, the model
    try:
        return training.run_evaluation(config, checkpoint=args.checkpoint, split=args.split)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, training.USER_ERRORS))
