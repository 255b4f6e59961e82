"""Screenshot of demo.py with two checkpoints side by side, for the README (docs/demo.png).

    python scripts/demo_screenshot.py      # after the toy quickstart: toy SMILE vs MLE on the first toy test image

Serves the demo on a free local port, uploads the image in headless Chromium (Debian's chromium and
chromium-driver, as the browser test), presses Caption, and saves the window once both captions are shown.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from PIL import Image

import demo
from models import Captioner
from tests.browser import (
    caption_upload,
    exit_without_browser,
    free_port,
    headless_chromium,
)


def first_toy_test_image(toy_root: Path) -> Path:
    """The first image of the toy test split (cache/toy/toy_test.json names images relative to its folder)."""
    return toy_root / json.loads((toy_root / "toy_test.json").read_text())[0]["image"]


def take_screenshot(checkpoints: list[str], names: list[str] | None, image: Path, args: argparse.Namespace,
                    scratch: Path) -> dict[str, str]:
    """Serve, caption ``image`` in the browser, write ``args.out``; returns {name: caption shown}."""
    exit_without_browser()
    names = demo.resolve_names(checkpoints, names)
    captioners = {name: Captioner.from_pretrained(path, device=args.device) for name, path in zip(names, checkpoints)}
    app = demo.build_demo(captioners)
    port = free_port()
    demo.launch(app, port=port, prevent_thread_lock=True)
    driver = None
    try:
        driver = headless_chromium(scratch / "chromium-profile", args.width, args.height)
        driver.get(f"http://127.0.0.1:{port}/")
        captions = caption_upload(driver, image, models=len(captioners))
        shot = scratch / "shot.png"
        driver.save_screenshot(str(shot))
    finally:
        if driver is not None:
            driver.quit()
        app.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A flat UI needs few colours: a 256-colour palette keeps text sharp at a fraction of the size.
    Image.open(shot).convert("RGB").quantize(256).save(args.out, optimize=True)
    return dict(zip(names, captions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append",
                        help="default: runs/toy/smile and runs/toy/mle checkpoint_best.safetensors")
    parser.add_argument("--name", action="append", help="default: SMILE, MLE")
    parser.add_argument("--image", type=Path, help="default: the first image of cache/toy/toy_test.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--device", default="cpu", help="default cpu, so the shot does not depend on the GPU")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoint or [str(ROOT / "runs/toy/smile/checkpoint_best.safetensors"),
                                      str(ROOT / "runs/toy/mle/checkpoint_best.safetensors")]
    names = args.name or (["SMILE", "MLE"] if not args.checkpoint else None)
    image = args.image or first_toy_test_image(ROOT / "cache" / "toy")

    scratch = Path(tempfile.mkdtemp(prefix="demo_screenshot_"))
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")  # the upload and preview go here, removed at the end
    try:
        captions = take_screenshot(checkpoints, names, image, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for name, caption in captions.items():
        print(f"{name}: {caption}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
