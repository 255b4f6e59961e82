"""Tiny offline stand-ins for the metric models (CLIP ViT-B/32, GPT-2) and synthetic caption data.

The Hugging Face hub is unreachable in CI, so the tests build random-weight models with real
architectures and real tokenizer classes (byte-level BPE with a handful of whole-word merges),
save them with `save_pretrained`, and load them back through the same code path as a hub model.
Used by tests/metrics/test_metrics_*.py and benchmarks/bench_metrics.py.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Words of the synthetic captions; also the BPE merges, so these tokenise to one token each.
NOUNS = ["dog", "cat", "man", "woman", "bus", "car", "tree", "table", "pizza", "horse", "boat",
         "kite", "train", "street", "grass", "beach", "room", "bed", "cake", "clock", "bird", "sign"]
ADJECTIVES = ["red", "large", "small", "white", "black", "old", "young", "wooden", "green", "busy"]
VERBS = ["sitting", "standing", "riding", "holding", "eating", "flying", "walking", "lying", "parked"]
FUNCTION_WORDS = ["a", "an", "the", "on", "in", "of", "with", "next", "to", "near", "and", "two", "is",
                  "photo", "depicts", "there", "top", "some", "are"]
WORDS = NOUNS + ADJECTIVES + VERBS + FUNCTION_WORDS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _chain_merges(symbols: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that build one word token from its symbols."""
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def _write_bpe(folder: Path, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def _reinitialise(model: torch.nn.Module, seed: int, keep=()) -> None:
    """Draw every weight from one generator in name order: biases 0, norm scales 1, the rest N(0, 0.05).

    transformers' own initialisation differs between releases, so without this the tiny models (and what the
    tests check of them, e.g. that a random CLIP gives both negative and positive cosines) would differ between
    the two ends of the transformers range CI tests."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if any(part in name for part in keep):
                continue
            if name.endswith("bias"):
                parameter.zero_()
            elif "norm" in name or "layrnorm" in name:
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def build_tiny_clip(folder: str | Path, seed: int = 0, words=WORDS) -> Path:
    """A random 2-layer CLIP (text width 32, 32 px images, patch 8, projection 16) + tokenizer +
    image processor, saved to `folder` in hub layout. Returns `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    alphabet = list(_bytes_to_unicode().values())
    merges = list(dict.fromkeys(m for w in words if len(w) > 1
                                for m in _chain_merges(list(w[:-1]) + [w[-1] + "</w>"])))
    vocab = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    raw = folder / "bpe"
    _write_bpe(raw, vocab, merges)
    tokenizer = CLIPTokenizer.from_pretrained(raw)
    tokenizer.model_max_length = 77
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    _reinitialise(model, seed, keep=("logit_scale",))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_gpt2(folder: str | Path, seed: int = 0, words=WORDS, n_positions: int = 64) -> Path:
    """A random 2-layer GPT2LMHeadModel (width 32, `n_positions` context) + byte-level BPE GPT-2
    tokenizer whose BOS/EOS is <|endoftext|>, saved to `folder`. Returns `folder`."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    folder = Path(folder)
    space = _bytes_to_unicode()[ord(" ")]  # "Ġ": marks a word preceded by a space
    alphabet = list(_bytes_to_unicode().values())
    # Space-prefixed chains first: in " dog" only the leftmost symbol starts with "Ġ", so these
    # merges apply greedily from the left and give one token per word.
    spaced = [m for w in words for m in _chain_merges([space] + list(w))]
    initial = [m for w in words if len(w) > 1 for m in _chain_merges(list(w))]
    merges = list(dict.fromkeys(spaced + initial))
    vocab = list(dict.fromkeys(alphabet + [a + b for a, b in merges])) + ["<|endoftext|>"]
    raw = folder / "bpe"
    _write_bpe(raw, vocab, merges)
    tokenizer = GPT2Tokenizer.from_pretrained(raw)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_images(folder: str | Path, count: int, size: int = 32, seed: int = 0, prefix: str = "img") -> list[str]:
    """`count` random RGB PNGs (`size` px) named ``{prefix}_{i:05d}.png``; returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        name = f"{prefix}_{i:05d}.png"
        # a random colour field plus noise: distinct images with distinct CLIP features
        base = rng.integers(0, 256, size=(1, 1, 3))
        pixels = np.clip(base + rng.integers(-40, 41, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def synthetic_caption(rng: random.Random) -> str:
    """A COCO-like sentence from the fixture vocabulary, 6-15 words, sometimes with punctuation."""
    words = ["a", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)]
    while len(words) < rng.randint(6, 15):
        words += [rng.choice(["on", "in", "next to", "near", "with"]), "the", rng.choice(NOUNS)]
    caption = " ".join(words)
    return (caption[0].upper() + caption[1:] + ".") if rng.random() < 0.5 else caption


def synthetic_coco(num_images: int, file_names: list[str] | None = None, refs_per_image: int = 5,
                   seed: int = 0) -> tuple[dict, list[dict]]:
    """COCO-format GT (ids 1..N, `refs_per_image` references each) and one result per image."""
    rng = random.Random(seed)
    file_names = file_names or [f"img_{i:05d}.png" for i in range(num_images)]
    images = [{"id": i + 1, "file_name": file_names[i]} for i in range(num_images)]
    annotations = [{"image_id": img["id"], "id": k, "caption": synthetic_caption(rng)}
                   for k, img in enumerate(img for img in images for _ in range(refs_per_image))]
    results = [{"image_id": img["id"], "caption": synthetic_caption(rng).lower().rstrip(".")} for img in images]
    return {"images": images, "annotations": annotations}, results


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """12 random 32 px images (various colours) and their file names."""
    folder = tmp_path_factory.mktemp("images")
    return folder, make_images(folder, 12, seed=1)
