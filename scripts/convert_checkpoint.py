"""Convert an original salesforce/BLIP (or SMILE) caption checkpoint into a transformers directory.

    python scripts/convert_checkpoint.py model_base_caption_capfilt_large.pth out/blip-base --arch base --image-size 384

The directory loads with ``BlipForConditionalGeneration.from_pretrained`` and ``BlipProcessor.from_pretrained``
(BLIP's bicubic resize and CLIP normalisation, and the BERT tokenizer with ``[DEC]``/``[ENC]``).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import BlipCaptioner, load_pretrained  # noqa: E402
from models.captioner import DEFAULT_TOKENIZER  # noqa: E402
from models.checkpoint import DEFAULT_CACHE_DIR, save_transformers_directory  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="original .pth path or URL (or any source models.checkpoint accepts)")
    parser.add_argument("output_dir", help="transformers directory to write")
    parser.add_argument("--arch", default="base", help="architecture preset: base, large or tiny (default: base)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="hub id, tokenizer dir or vocab.txt")
    parser.add_argument("--prompt", default="a picture of ")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where downloaded checkpoints are kept")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    captioner = BlipCaptioner.build(args.arch, image_size=args.image_size, tokenizer=args.tokenizer, prompt=args.prompt)
    load_pretrained(captioner, args.checkpoint, cache_dir=args.cache_dir)
    save_transformers_directory(captioner, args.output_dir)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
