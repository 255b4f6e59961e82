"""Export a checkpoint of this repository in its model family's own format (the captioner's ``export_directory``):
for BLIP, a transformers directory (model + BlipProcessor).

    python scripts/export_hf.py runs/coco/smile/checkpoint_best.safetensors out/blip-smile
    python scripts/export_hf.py runs/coco/smile/checkpoint_best.safetensors out/blip-smile --push-to-hub user/blip-smile

The directory loads with stock transformers classes only::

    model = BlipForConditionalGeneration.from_pretrained("out/blip-smile")
    processor = BlipProcessor.from_pretrained("out/blip-smile")
    inputs = processor(images=image, text="a picture of", return_tensors="pt")
    caption = processor.decode(model.generate(**inputs, num_beams=3, max_length=75)[0], skip_special_tokens=True)

The checkpoint's own config supplies the family, architecture, image size, tokenizer and prompt (BLIP's prompt is
also written to ``smile_blip.json``). A prefix-LM checkpoint (``model.family: prefix``) exports as ``gpt2/`` and
``clip/`` (ordinary transformers GPT-2 and CLIP vision directories), ``prefix_mapper.safetensors`` and
``prefix_captioner.json``. ``models.Captioner.from_pretrained(DIR)`` loads either back (each family's
``from_exported``). ``--push-to-hub`` uploads the directory when you are logged in
(``huggingface-cli login``); it is never needed for local use.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import training  # noqa: E402
from models.checkpoint import load_checkpoint_file  # noqa: E402


def export(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Write ``checkpoint`` (this repository's .safetensors) as a transformers directory; returns its path."""
    _, _, metadata = load_checkpoint_file(checkpoint)
    config = metadata.get("config")
    if not config:
        raise ValueError(f"{checkpoint} carries no config; export needs its model section (arch, image size, ...)")
    captioner = training.build_captioner(config, torch.device("cpu"), pretrained=str(checkpoint))
    return captioner.export_directory(output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint_best.safetensors or checkpoint_latest.safetensors of a run")
    parser.add_argument("output_dir")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to this hub repository")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir = export(args.checkpoint, args.output_dir)
    print(f"wrote {output_dir}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        HfApi().upload_folder(folder_path=str(output_dir), repo_id=args.push_to_hub, repo_type="model")
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
