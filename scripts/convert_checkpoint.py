"""Convert an original salesforce/BLIP (or SMILE) caption checkpoint into a transformers directory.

    python scripts/convert_checkpoint.py model_base_caption_capfilt_large.pth out/blip-base --arch base --image-size 384

The directory loads with ``BlipForConditionalGeneration.from_pretrained`` and ``BlipProcessor.from_pretrained``
(BLIP's bicubic resize and CLIP normalisation, and the BERT tokenizer with ``[DEC]``/``[ENC]``).

An original ClipCap checkpoint (rmokady/CLIP_prefix_caption: ``coco_weights.pt``, ``conceptual_weights.pt``, the
transformer-mapper weights) converts with ``--clipcap-gpt2`` (a GPT-2 directory giving the architecture) into a
prefix-captioner directory that ``models.PrefixCaptioner.from_directory`` loads:

    python scripts/convert_checkpoint.py coco_weights.pt out/clipcap-coco --clipcap-gpt2 gpt2 \
        --clip openai/clip-vit-base-patch32
    python scripts/convert_checkpoint.py transformer_weights.pt out/clipcap-tf --clipcap-gpt2 gpt2 \
        --mapping-type transformer --prefix-length 40 --clip-length 40 --num-layers 8
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import BlipCaptioner, load_clipcap_checkpoint, load_pretrained  # noqa: E402
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
    clipcap = parser.add_argument_group("original ClipCap checkpoints (selected by --clipcap-gpt2)")
    clipcap.add_argument("--clipcap-gpt2", help="GPT-2 directory or hub id (config + tokenizer) of the checkpoint")
    clipcap.add_argument("--clip", help="CLIP directory or hub id for the image tower (optional)")
    clipcap.add_argument("--mapping-type", choices=("mlp", "transformer"), default="mlp")
    clipcap.add_argument("--prefix-length", type=int, default=10)
    clipcap.add_argument("--clip-length", type=int, default=None, help="transformer mapper; default: from the file")
    clipcap.add_argument("--num-layers", type=int, default=8, help="transformer mapper layers")
    clipcap.add_argument("--prefix-size", type=int, default=512, help="CLIP embedding width (512 ViT-B/32, 640 RN50x4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.clipcap_gpt2:
        captioner = load_clipcap_checkpoint(
            args.checkpoint, gpt2=args.clipcap_gpt2, mapping_type=args.mapping_type, prefix_length=args.prefix_length,
            clip_length=args.clip_length, num_layers=args.num_layers, prefix_size=args.prefix_size, clip=args.clip,
        )
        captioner.save_directory(args.output_dir)
        print(f"wrote {args.output_dir}")
        return

    captioner = BlipCaptioner.build(args.arch, image_size=args.image_size, tokenizer=args.tokenizer, prompt=args.prompt)
    load_pretrained(captioner, args.checkpoint, cache_dir=args.cache_dir)
    save_transformers_directory(captioner, args.output_dir)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
