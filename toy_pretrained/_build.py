"""What the toy CLIP and GPT-2 builders share: the cached, atomic, locked build and the word-level tokenizer.

A build writes a whole transformers directory into a temporary sibling folder and renames it into place, so a
reader never sees half a model; ``manifest.json`` (written last) records the recipe, the toy dataset it was
trained on and FORMAT_VERSION, and a folder whose manifest does not match is rebuilt. A lock file beside the
folder (fcntl.flock, POSIX) makes concurrent callers (torchrun ranks) wait for one builder and reuse its work.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

import utils

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "[UNK]"
# CLIPScore prepends "A photo depicts"; BLIP prompts with "a picture of". Lower-cased by the tokenizers.
EXTRA_WORDS = ("a", "photo", "depicts", "picture", "of")
_WORD = re.compile(r"[a-z0-9]+")


def toy_words(captions: Iterable[str]) -> list[str]:
    """The sorted lower-case words of `captions` plus EXTRA_WORDS: the toy tokenizers' vocabulary."""
    words = set(EXTRA_WORDS)
    for caption in captions:
        words.update(_WORD.findall(caption.lower()))
    return sorted(words)


def word_level_tokenizer(words: list[str], specials: list[str], add_bos_eos: bool, model_max_length: int,
                         bos: str | None, eos: str, pad: str, model_input_names: list[str] | None = None):
    """A `PreTrainedTokenizerFast` over whole words: ids 0.. are `specials`, then `words`.

    Lower-cases its input and splits on whitespace and punctuation (each punctuation mark is its own token,
    [UNK] here: the toy captions have none); a word outside `words` becomes [UNK]. With `add_bos_eos` the
    tokenizer wraps every text as ``bos text eos`` (what CLIP's tokenizer does); without, it adds nothing (as
    GPT-2's; the perplexity metric prepends BOS itself). ``model_input_names``: what it returns (transformers 4.x's
    default adds ``token_type_ids``, which a LLaVA's ``generate`` refuses). Saved with ``tokenizer_class:
    PreTrainedTokenizerFast``, which AutoTokenizer loads in transformers 4.57+ and 5.x alike.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*specials, *words])}
    if len(vocab) != len(specials) + len(words):
        raise ValueError("a special token is also a word of the toy vocabulary")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos_eos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    names = {} if model_input_names is None else {"model_input_names": list(model_input_names)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=UNK, model_max_length=model_max_length, **names)


def save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 writes its own class name ("TokenizersBackend"), which 4.x does not know.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None


def toy_references(path: Path, what: str) -> tuple[list[str], list[str]]:
    """(image path, caption) of every reference of a toy annotation file: a train file (one caption per entry) or
    a val/test file (a list per entry); a ValueError names the file and the first malformed entry."""
    images, captions = [], []
    for index, entry in enumerate(read_json(path, what)):
        caption = entry.get("caption") if isinstance(entry, dict) else None
        caption = [caption] if isinstance(caption, str) else caption
        if (not isinstance(caption, list) or not caption or not all(isinstance(c, str) for c in caption)
                or not isinstance(entry.get("image"), str)):
            raise ValueError(f"{path}: entry {index} needs a str 'image' and a 'caption' (a str or a list of str), "
                             f"got {entry!r}")
        images += [entry["image"]] * len(caption)
        captions += caption
    return images, captions


def toy_dataset_manifest(toy_root: Path) -> dict:
    """The toy set's own manifest.json: part of every recipe, so a rebuilt toy set means a rebuilt model."""
    manifest = read_json(Path(toy_root) / "manifest.json", "toy dataset manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"{toy_root}/manifest.json should hold a dict, got {type(manifest).__name__}")
    return manifest


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _matches(folder: Path, recipe: dict, required: Iterable[str]) -> bool:
    manifest = _read_manifest(folder)
    if manifest is None or {key: manifest.get(key) for key in recipe} != recipe:
        return False
    return all((folder / name).is_file() for name in required)


def ensure_built(folder: str | Path, recipe: dict, required: Iterable[str],
                 build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp_folder) -> report`` unless `folder` already holds a build of `recipe`; return `folder`.

    The manifest is ``{**recipe, "report": report, "build_seconds": s}``; only the recipe decides reuse.

    Raises:
        FileExistsError: `folder` exists, is not empty, and holds no build of this `recipe["generator"]`
            (it is never deleted).
    """
    required = tuple(required)
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with utils.exclusive_lock(folder.parent / f"{folder.name}.lock"):
        if _matches(folder, recipe, required):
            return folder
        if folder.exists():
            existing = _read_manifest(folder)
            if not folder.is_dir() or (any(folder.iterdir()) and (existing or {}).get("generator") != recipe["generator"]):
                raise FileExistsError(f"{folder} exists and holds no {recipe['generator']} build (no matching "
                                      "manifest.json); refusing to replace it (delete it or name another folder)")
        started = time.perf_counter()

        def write(building: Path) -> dict:
            report = build(building)
            manifest = {**recipe, "report": report, "build_seconds": round(time.perf_counter() - started, 1)}
            (building / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            return manifest

        manifest = utils.build_folder(folder, write)
        logger.info("built %s in %.1f s: %s", folder, manifest["build_seconds"], manifest["report"])
    return folder


def train_in_epochs(parameters, num_examples: int, recipe, loss_of_batch: Callable, generator, what: str,
                    max_grad_norm: float | None = None) -> tuple[list[float], int]:
    """The toy builders' training loop: AdamW (``recipe.lr``, ``recipe.weight_decay``) with a linear warmup over
    ``recipe.warmup_fraction`` of the steps then a cosine to 0, for ``recipe.epochs`` epochs; each epoch draws a
    permutation of ``num_examples`` from ``generator`` and calls ``loss_of_batch(index)`` (index: (B,) long, B =
    ``recipe.batch_size`` at most, the last incomplete batch dropped) for a scalar loss to step on. Gradients are
    clipped at ``max_grad_norm`` when given. The caller puts the model in train mode.

    Returns:
        (the losses of every step, steps per epoch).
    """
    parameters = [p for p in parameters if p.requires_grad]
    batch = min(recipe.batch_size, num_examples)
    steps_per_epoch = num_examples // batch
    total = recipe.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, max(1, int(recipe.warmup_fraction * total))))
    losses: list[float] = []
    for epoch in range(recipe.epochs):
        order = torch.randperm(num_examples, generator=generator)
        for step in range(steps_per_epoch):
            loss = loss_of_batch(order[step * batch:(step + 1) * batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        logger.info("%s epoch %d: loss %.3f", what, epoch, sum(losses[-steps_per_epoch:]) / steps_per_epoch)
    return losses, steps_per_epoch


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return utils.cosine_lr(min(step - warmup, total - warmup), total - warmup, 1.0)
