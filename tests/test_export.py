"""A toy checkpoint exported to the transformers format captions identically with stock transformers classes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

import training
import train_caption

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_export_reloads_with_stock_classes_and_captions_identically(tmp_path):
    run = tmp_path / "run"
    options = [f"data.toy_root={tmp_path / 'toy'}", f"output_dir={run}", "data.num_workers=0", "train.max_steps=30", "train.batch_size=32",
               "train.epochs=1", "train.validate=false", "train.test_after_training=false", "train.lr=2e-3"]
    train_caption.main(["--config", str(REPO / "configs" / "toy" / "pretrain.yaml"),
                        *[item for option in options for item in ("--opt", option)]])
    checkpoint = run / "checkpoint_best.safetensors"
    out = tmp_path / "exported"
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), str(checkpoint), str(out)],
                   check=True, capture_output=True, cwd=REPO)

    # Captions as eval_caption.py makes them.
    config = training.resolve_data_paths(training.load_config(REPO / "configs" / "toy" / "pretrain.yaml", options))
    config["eval"]["max_images"] = 16
    captioner = training.build_captioner(config, torch.device("cpu"), pretrained=str(checkpoint))
    loader, _ = training.build_eval_loader(config, "val", captioner.eval_transform())
    ours = {row["image_id"]: row["caption"] for row in training.generate_captions(captioner, loader, config, torch.device("cpu"))}

    # The same images and decoding settings through stock transformers only.
    model = BlipForConditionalGeneration.from_pretrained(out).eval()
    processor = BlipProcessor.from_pretrained(out)
    prompt = json.loads((out / "smile_blip.json").read_text())["prompt"]
    stock = {}
    for images, image_ids in loader:
        inputs = processor(text=[prompt] * len(images), return_tensors="pt")
        generated = model.generate(pixel_values=images, input_ids=inputs.input_ids, num_beams=3,
                                   max_length=config["eval"]["max_length"], min_length=config["eval"]["min_length"])
        for image_id, ids in zip(image_ids.tolist(), generated):
            text = processor.decode(ids, skip_special_tokens=True)
            stock[image_id] = text[len(prompt):].strip()
    assert stock == ours and len(ours) == 16
