"""Gradio demo: caption an uploaded image with one or two checkpoints side by side (e.g. MLE vs SMILE).

    python demo.py --checkpoint runs/toy/smile/checkpoint_best.safetensors --name SMILE \\
                   --checkpoint runs/toy/mle/checkpoint_best.safetensors --name MLE

then open http://127.0.0.1:7860. The server listens on 127.0.0.1 only unless ``--host`` says otherwise, never
opens a public share link, and sends no analytics, so it runs on an offline machine. Uploads are checked here
before any decoder sees them: size (``--max-upload-mb``), that PIL decodes them, and pixel count
(``--max-pixels``, against decompression bombs); a rejected upload gets a message on the page.

The logic (upload checks, decoding settings, captioning with both models) lives in small functions that the tests
call without a browser; ``build_demo`` only wires them to components.
"""
from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Before gradio is imported anywhere (it reads this on import): unset, gradio sends usage analytics and checks
# PyPI for a newer version, network calls an offline demo must not make.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch
from PIL import Image, UnidentifiedImageError

import hub
import utils
from imaging import open_rgb
from metrics.text_stats import caption_lengths
from models import Captioner, CheckpointError
from models.checkpoint import CHECKPOINT_SUFFIXES, looks_like_hub_id
from models.inference import DEFAULT_GENERATION

BEAM_SEARCH = "beam search"
NUCLEUS_SAMPLING = "nucleus sampling"
METHODS = (BEAM_SEARCH, NUCLEUS_SAMPLING)
DEFAULT_MAX_UPLOAD_MB = 10.0
# A 48-megapixel phone photo fits; a PNG that claims more (a few KB can claim gigapixels) is refused before
# decoding. Well under PIL's own Image.MAX_IMAGE_PIXELS (~89 M), which only warns below twice that.
DEFAULT_MAX_PIXELS = 50_000_000
# Gradio's default theme pulls its fonts from Google Fonts; these need no network.
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace")
# Fit the preview to its box: a small image (the toy set's are 64 px) would otherwise show as a thumbnail.
CSS = "#preview img { width: 100%; height: 100%; object-fit: contain; }"


class InputError(ValueError):
    """An upload or a setting the demo refuses; its message is shown on the page as it is."""


def validate_upload(path: str | Path, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                    display_name: str | None = None) -> Image.Image:
    """The uploaded file at ``path`` as an RGB image, or ``InputError`` saying why not.

    Checked in order of cost: the file size (before reading it), the pixel count from the header (before
    decoding, so a decompression bomb never allocates its pixels), then a full decode. ``display_name`` is what
    the message calls the file (the server-side temporary path means nothing to the user).
    """
    path = Path(path)
    name = display_name or path.name
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB.")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise InputError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
                                  f"the limit is {max_pixels / 1e6:g} megapixels.")
            probe.verify()  # structural checks (e.g. PNG chunk CRCs); leaves `probe` unusable for decoding
        # Decodes every pixel, so a truncated file fails here; upright by its EXIF orientation, as it is shown.
        return open_rgb(path, exif_transpose=True)
    except InputError:
        raise
    except Image.DecompressionBombError:
        # Image.open itself refuses past 2 x Image.MAX_IMAGE_PIXELS when that is below our own limit.
        raise InputError(f"{name} has too many pixels (a possible decompression bomb); "
                          f"the limit is {max_pixels / 1e6:g} megapixels.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # verify() raises SyntaxError for a broken PNG; truncated data raises OSError on decode.
        detail = "PIL cannot identify it" if isinstance(error, UnidentifiedImageError) else str(error)
        raise InputError(f"{name} is not a readable image ({detail}).") from None


@dataclass(frozen=True)
class DecodingSettings:
    """What the page's controls ask for. Lengths are tokens with the prompt included, as in BLIP."""

    method: str = BEAM_SEARCH
    num_beams: int = DEFAULT_GENERATION["num_beams"]
    top_p: float = DEFAULT_GENERATION["top_p"]
    max_length: int = DEFAULT_GENERATION["max_length"]
    min_length: int = DEFAULT_GENERATION["min_length"]
    repetition_penalty: float = DEFAULT_GENERATION["repetition_penalty"]
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"decoding method must be one of {', '.join(METHODS)}, not {self.method!r}.")
        if self.num_beams < 1:
            raise InputError(f"the number of beams must be at least 1, not {self.num_beams}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], not {self.top_p}.")
        if self.min_length > self.max_length:
            raise InputError(f"min length ({self.min_length}) is above max length ({self.max_length}).")

    def caption_options(self) -> dict:
        """Keyword arguments for ``Captioner.caption``."""
        return {"sample": self.method == NUCLEUS_SAMPLING, "num_beams": int(self.num_beams),
                "top_p": float(self.top_p), "max_length": int(self.max_length), "min_length": int(self.min_length),
                "repetition_penalty": float(self.repetition_penalty)}


def default_settings(captioners: dict[str, Captioner]) -> DecodingSettings:
    """The checkpoints' own decoding (their config's eval section) when they agree, else the repository's
    (configs/default.yaml's eval section), with the lengths cut to what every model can generate."""
    generations = [captioner.generation for captioner in captioners.values()]
    chosen = generations[0] if all(g == generations[0] for g in generations) else DEFAULT_GENERATION
    chosen = {**DEFAULT_GENERATION, **chosen}
    longest = length_limit(captioners)
    return DecodingSettings(
        method=NUCLEUS_SAMPLING if chosen["sample"] else BEAM_SEARCH,
        num_beams=chosen["num_beams"], top_p=chosen["top_p"], max_length=min(chosen["max_length"], longest),
        min_length=min(chosen["min_length"], longest), repetition_penalty=chosen["repetition_penalty"],
    )


def length_limit(captioners: dict[str, Captioner], cap: int = 150) -> int:
    """The largest max length every model can generate: past its position embeddings a decoder fails."""
    return min([cap, *(captioner.max_positions for captioner in captioners.values())])


def word_count(caption: str) -> int:
    """Words in a caption as the paper's Cap. Len. counts them (`metrics.text_stats`)."""
    return caption_lengths([caption])[0]


def format_length(words: int) -> str:
    return f"{words} word" if words == 1 else f"{words} words"


_GENERATION_LOCK = threading.Lock()


def caption_with_all(captioners: dict[str, Captioner], image: Image.Image,
                     settings: DecodingSettings) -> dict[str, tuple[str, int]]:
    """``{name: (caption, word count)}`` for one image, in the captioners' order.

    Each model generates right after ``torch.manual_seed(settings.seed)``, so a sampled caption depends on the
    seed and the model only, not on which model ran first. The global RNG is forked (left as it was) and the
    lock keeps two requests from seeding over each other.
    """
    results = {}
    with _GENERATION_LOCK:
        for name, captioner in captioners.items():
            device = captioner.device
            cuda_devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(int(settings.seed))
                caption = captioner.caption(image, **settings.caption_options())
            results[name] = (caption, word_count(caption))
    return results


def default_name(source: str) -> str:
    """A column label from a checkpoint: the run folder of a checkpoint file, else the last path part."""
    path = Path(source)
    if path.is_file() or path.suffix in CHECKPOINT_SUFFIXES:  # a missing one too: main then says it is missing
        return path.parent.name or path.stem
    return path.name or str(source)


def resolve_names(sources: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names and len(names) != len(sources):
        raise ValueError(f"got {len(names)} --name for {len(sources)} --checkpoint; give one per checkpoint or none")
    resolved = list(names) if names else [default_name(source) for source in sources]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"the model names must differ, got {resolved}; pass --name for each checkpoint")
    return resolved


def escape_markdown(text: str) -> str:
    """A user-supplied file name shown verbatim inside Markdown."""
    return "".join("\\" + char if char in "\\`*_{}[]()#+-.!<>|~" else char for char in text)


def build_demo(captioners: dict[str, Captioner], max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_pixels: int = DEFAULT_MAX_PIXELS, defaults: DecodingSettings | None = None):
    """A ``gr.Blocks`` app captioning one upload with each model side by side; launch it with ``launch``."""
    import gradio as gr

    if not 1 <= len(captioners) <= 2:
        raise ValueError(f"the demo shows one or two models, got {len(captioners)}")
    names = list(captioners)
    defaults = defaults or default_settings(captioners)
    max_bytes = int(max_upload_mb * 2**20)
    longest = length_limit(captioners)

    def check(file_path: str | None) -> Image.Image:
        if file_path is None:
            raise InputError("upload an image first.")
        return validate_upload(file_path, max_bytes, max_pixels)

    def rejected(error: Exception) -> str:
        return f"**Rejected:** {escape_markdown(str(error))}"

    def on_upload(file_path):
        blank = [""] * (2 * len(names))
        if file_path is None:
            return [None, "", *blank]
        try:
            image = check(file_path)
        except InputError as error:
            return [None, rejected(error), *blank]
        return [image, "", *blank]

    def on_caption(file_path, method, num_beams, top_p, max_length, min_length, repetition_penalty, seed):
        try:
            image = check(file_path)
            settings = DecodingSettings(method, int(num_beams), float(top_p), int(max_length), int(min_length),
                                        float(repetition_penalty), int(seed or 0))
            if settings.max_length > longest:
                raise InputError(f"max length {settings.max_length} is above what the models can generate "
                                 f"({longest} tokens).")
        except InputError as error:
            return [rejected(error)] + [""] * (2 * len(names))
        outputs = []
        for caption, words in caption_with_all(captioners, image, settings).values():
            outputs += [caption, format_length(words)]
        return [""] + outputs

    # delete_cache: uploads and previews older than an hour are removed hourly, so a long-running demo does not
    # fill the temporary directory.
    with gr.Blocks(title="SMILE captioning demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## Image captioning: {' vs '.join(names)}\n"
                    "Upload an image and press **Caption**; each model captions it with the settings below.")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label=f"Image (at most {max_upload_mb:g} MB)", file_types=["image"],
                                 elem_id="upload")
                preview = gr.Image(label="Preview", interactive=False, height=220, elem_id="preview")
            with gr.Column(scale=3):
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                status = gr.Markdown(elem_id="status")
                caption_outputs = []
                with gr.Row():
                    for index, name in enumerate(names):
                        with gr.Column():
                            caption_outputs.append(gr.Textbox(label=name, lines=3, interactive=False,
                                                              elem_id=f"caption-{index}"))
                            caption_outputs.append(gr.Markdown(elem_id=f"length-{index}"))
        with gr.Accordion("Decoding", open=True):
            with gr.Row():
                method = gr.Radio(list(METHODS), value=defaults.method, label="Method")
                num_beams = gr.Slider(1, 10, value=defaults.num_beams, step=1, label="Beams (beam search)")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p (sampling)")
                seed = gr.Number(value=defaults.seed, precision=0, label="Seed (sampling)")
            with gr.Row():
                max_length = gr.Slider(1, longest, value=min(defaults.max_length, longest), step=1,
                                       label="Max length (tokens, prompt included)")
                min_length = gr.Slider(0, longest, value=min(defaults.min_length, longest), step=1,
                                       label="Min length (tokens, prompt included)")
                repetition_penalty = gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05,
                                               label="Repetition penalty")

        upload.change(on_upload, inputs=upload, outputs=[preview, status, *caption_outputs])
        button.click(on_caption,
                     inputs=[upload, method, num_beams, top_p, max_length, min_length, repetition_penalty, seed],
                     outputs=[status, *caption_outputs])
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
           prevent_thread_lock: bool = False, quiet: bool = True):
    """Serve ``demo`` locally: no share link, system fonts, Gradio's own upload limit set to ours."""
    import gradio as gr

    theme = gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))
    return demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
                       max_file_size=int(max_upload_mb * 2**20), theme=theme, css=CSS, ssr_mode=False, quiet=quiet,
                       footer_links=[])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a training checkpoint (checkpoint_best.safetensors), a transformers directory or hub "
                             "id; give it twice to compare two models side by side")
    parser.add_argument("--name", action="append", help="a label per --checkpoint (default: the run folder name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 shares it with "
                             "the local network, which you should only do on a network you trust)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest accepted upload, in MiB (default %(default)g)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="largest accepted width x height (default %(default)d); larger uploads are refused "
                             "before decoding")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: CUDA if available)")
    args = parser.parse_args(argv)
    if len(args.checkpoint) > 2:
        parser.error("give one or two --checkpoint")
    try:
        args.name = resolve_names(args.checkpoint, args.name)
    except ValueError as error:
        parser.error(str(error))
    if args.max_upload_mb <= 0 or args.max_pixels <= 0:
        parser.error("--max-upload-mb and --max-pixels must be positive")
    return args


REPO = Path(__file__).resolve().parent
# What the entry point prints as one line with exit status 2 (utils.run_cli): a checkpoint that is missing or
# unreadable, a hub id this machine cannot fetch.
USER_ERRORS = (CheckpointError, hub.HubError, utils.ConfigError)


def training_command(checkpoint: Path) -> str | None:
    """``bash scripts/train.sh <config>`` for the config under configs/ whose ``output_dir`` is ``checkpoint``'s
    folder (e.g. configs/toy/mle.yaml for runs/toy/mle/checkpoint_best.safetensors), or None."""
    folder = checkpoint.expanduser().absolute().parent
    for config in sorted((REPO / "configs").rglob("*.yaml")):
        try:
            output_dir = utils.load_yaml_with_bases(config).get("output_dir")
        except utils.ConfigError:
            continue
        if output_dir and folder in {Path(output_dir).absolute(), (REPO / output_dir).absolute()}:
            return f"bash scripts/train.sh {config.relative_to(REPO)}"
    return None


def check_checkpoint(source: str) -> None:
    """A ``--checkpoint`` that names a local file must exist, before any model is loaded: the error names the
    file and, when a config under configs/ writes it, the command that creates it."""
    path = Path(source).expanduser()
    if path.exists() or hub.is_url(source) or looks_like_hub_id(source):
        return
    command = training_command(path)
    how = f"train it first: {command}" if command else "train it first (bash scripts/train.sh CONFIG)"
    raise CheckpointError(f"--checkpoint {source}: no such file ({path.absolute()}); {how}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for source in args.checkpoint:  # before any model is loaded
        check_checkpoint(source)
    captioners = {name: Captioner.from_pretrained(source, device=args.device)
                  for name, source in zip(args.name, args.checkpoint)}
    demo = build_demo(captioners, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels)
    print(f"Serving {' and '.join(captioners)} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    launch(demo, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main, USER_ERRORS))
