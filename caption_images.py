"""Caption images at scale: a folder, a glob, a list file, webdataset shards or parquet in; one caption per image out.

    python caption_images.py --checkpoint CKPT --input PATH [PATH ...] --out OUT [options]

    # a folder (recursive) into one JSONL file; run the same command again to resume after a crash
    python caption_images.py --checkpoint runs/coco/smile/checkpoint_best.safetensors --input photos/ \\
        --out captions.jsonl
    # img2dataset shards on every GPU of this machine, per-rank part files kept in a folder
    bash scripts/caption.sh --checkpoint CKPT --input 'shards/{00000..00099}.tar' --out captions/
    # parquet with image bytes, written as parquet; best of 5 beams by CLIP-S
    python caption_images.py --checkpoint CKPT --input images.parquet --image-column jpg --key-column key \\
        --out captions.parquet --candidates 5 --rerank clip --clip-model openai/clip-vit-base-patch32

--checkpoint takes anything Captioner.from_pretrained loads (this repository's checkpoints, original BLIP/SMILE
.pth, transformers folders or hub ids, ClipCap .pt, exported folders). Generation options default to the
checkpoint's own eval section, else to configs/default.yaml's (beam 3, max length 75). Bad images are listed in
failed.jsonl and the run goes on; a summary.json is written beside the output. See docs/captioning.md.
"""
import argparse
import sys

import utils
from captioning import job
from data.image_inputs import INPUT_FORMATS


def _flag_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="anything Captioner.from_pretrained loads")
    parser.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="PATH",
                        help="folder, glob, list file (one path per line), tar shards (brace ranges: "
                             "'s/{00000..00009}.tar') or parquet; several allowed")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, help="override the kind detected from each path")
    parser.add_argument("--image-column", default="image", help="parquet: the column of image bytes or paths")
    parser.add_argument("--key-column", help="parquet: the column of keys (default: FILE.parquet:ROW)")
    parser.add_argument("--out", required=True, help="a .jsonl or .parquet file (rank parts merged into it), or a "
                        "folder (per-rank part files)")
    parser.add_argument("--out-format", choices=("jsonl", "parquet"), help="default: from --out's suffix, else jsonl")
    parser.add_argument("--write-sidecar", action="store_true",
                        help="also write IMAGE.txt beside each image file (folder, glob and list inputs)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=32, help="images per generate call, per process")
    run.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images, per process")
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    run.add_argument("--device-decode", choices=("auto", "on", "off"), default="auto",
                     help="decode plain JPEGs on the device (nvJPEG; auto: on CUDA)")
    run.add_argument("--seed", type=int, default=0, help="for --sample (each rank adds its rank)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    gen = parser.add_argument_group("generation (default: the checkpoint's eval section, else configs/default.yaml's)")
    gen.add_argument("--num-beams", type=int)
    gen.add_argument("--max-length", type=int, help="tokens, prompt included (BLIP)")
    gen.add_argument("--min-length", type=int)
    gen.add_argument("--sample", type=_flag_bool, nargs="?", const=True, help="nucleus sampling (with --top-p)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--no-repeat-ngram-size", type=int, help="> 0: no n-gram of that size twice in a caption")
    gen.add_argument("--prompt", help="the text prefix the model continues (default: the checkpoint's)")
    rerank = parser.add_argument_group("re-ranking (best of N by CLIP-S)")
    rerank.add_argument("--candidates", type=int, default=1, help="N candidate captions per image (beams, or samples "
                        "with --sample)")
    rerank.add_argument("--rerank", choices=job.RERANKERS, help="keep the candidate with the highest CLIP-S and write "
                        "it as clip_score")
    rerank.add_argument("--clip-model", help="CLIP hub id or folder for --rerank clip (the toy CLIP too)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    utils.setup_logging()
    generation = {name: getattr(args, name) for name in job.GENERATION_OPTIONS}
    options = job.JobOptions(
        checkpoint=args.checkpoint, inputs=args.inputs, out=args.out, input_format=args.input_format,
        image_column=args.image_column, key_column=args.key_column, out_format=args.out_format,
        write_sidecar=args.write_sidecar, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, device_decode=args.device_decode, prompt=args.prompt, generation=generation,
        candidates=args.candidates, rerank=args.rerank, clip_model=args.clip_model, seed=args.seed,
        progress=args.progress)
    try:
        return job.run(options)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    sys.exit(utils.run_cli(main, job.user_errors()))
