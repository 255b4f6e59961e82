"""The toy study's CLIP: a tiny transformers `CLIPModel` trained contrastively on the toy train split.

It stands in for CLIP ViT-B/32 wherever the toy flow needs one (self-retrieval R@K and CLIPScore, later CLIP-S
rewards), so it must judge captions: it is trained until text-to-image retrieval with the reference captions
of the toy *test* split is far above chance, and the build measures that and stores it in the folder's
``manifest.json`` (``report``).

Training (`ToyClipRecipe`): each step takes a batch of train images and, for each, one of its 5 references
drawn at random, so over the epochs every reference serves as the positive in turn; the loss is CLIP's
symmetric InfoNCE (`CLIPModel(return_loss=True)`). Half the texts carry CLIPScore's prefix "A photo depicts"
(lower-cased by the tokenizer), so prefixed and bare captions embed alike: CLIPScore prefixes every caption,
self-retrieval uses none. Images go through the saved `CLIPImageProcessor` (64 px, CLIP mean/std), exactly the
pipeline the metrics use, once, before training. Duplicate scenes in a batch are false negatives; the toy set
has 8 x 4 colour-shape pairs, so with terse references this caps the reachable retrieval, which the report's
``ceiling`` numbers quantify.

Cost: about 40 s on the 2-core development CPU (see README, Toy study).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path

import torch

from data.toy import toy_paths

from ._build import BOS, EOS, UNK, FORMAT_VERSION, ensure_built, read_json, save_tokenizer, toy_dataset_manifest, \
    toy_words, train_in_epochs, word_level_tokenizer

logger = logging.getLogger(__name__)

GENERATOR = "smile-toy-clip"
CLIPSCORE_PREFIX = "A photo depicts "  # metrics.clip_metrics.CLIPSCORE_PREFIX, plus the space it adds
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "preprocessor_config.json")


@dataclasses.dataclass(frozen=True)
class ToyClipRecipe:
    """Architecture and training of the toy CLIP (all of it goes into the manifest)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    projection_dim: int = 64
    context_length: int = 32
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    prefix_probability: float = 0.5
    seed: int = 0


def _train_images_and_captions(train_file: Path) -> tuple[list[str], list[list[str]]]:
    """Distinct image paths of the train file, in order, and each one's references."""
    by_image: dict[str, list[str]] = defaultdict(list)
    for index, entry in enumerate(read_json(train_file, "toy train file")):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(
                entry.get("caption"), str):
            raise ValueError(f"{train_file}: entry {index} needs a str 'image' and a str 'caption', got {entry!r}")
        by_image[entry["image"]].append(entry["caption"])
    counts = {len(refs) for refs in by_image.values()}
    if len(counts) != 1:
        raise ValueError(f"{train_file}: every image needs the same number of references, found {sorted(counts)}")
    return list(by_image), list(by_image.values())


def _pixels(paths: list[Path], processor) -> torch.Tensor:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return processor(images=images, return_tensors="pt")["pixel_values"]  # (N, 3, S, S)


def _token_grid(tokenizer, captions: list[list[str]], prefix: str, pad_id: int, length: int) -> torch.Tensor:
    """``(N, R, length)`` ids of ``prefix + caption`` for N images x R references, right-padded."""
    flat = [prefix + caption for refs in captions for caption in refs]
    ids = tokenizer(flat, truncation=True, max_length=length)["input_ids"]
    grid = torch.full((len(flat), length), pad_id, dtype=torch.long)
    for row, tokens in enumerate(ids):
        grid[row, :len(tokens)] = torch.tensor(tokens)
    return grid.view(len(captions), len(captions[0]), length)


def build_toy_clip(folder: Path, train_file: Path, image_root: Path, recipe: ToyClipRecipe,
                   test_file: Path | None = None, test_gt: Path | None = None) -> dict:
    """Train the toy CLIP and save model, tokenizer and image processor into `folder`; returns the report."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    image_paths, captions = _train_images_and_captions(train_file)
    words = toy_words(c for refs in captions for c in refs)
    tokenizer = word_level_tokenizer(words, [BOS, EOS, UNK], add_bos_eos=True, model_max_length=recipe.context_length,
                                     bos=BOS, eos=EOS, pad=EOS)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids([BOS, EOS])
    # EOS id 1, not 2: transformers' CLIP text tower pools at the first EOS, except for the legacy id 2.
    assert eos_id != 2
    processor = CLIPImageProcessor(size={"shortest_edge": recipe.image_size},
                                   crop_size={"height": recipe.image_size, "width": recipe.image_size})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=recipe.width, intermediate_size=recipe.mlp,
                         num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                         max_position_embeddings=recipe.context_length, bos_token_id=bos_id, eos_token_id=eos_id,
                         pad_token_id=eos_id),
        vision_config=dict(hidden_size=recipe.width, intermediate_size=recipe.mlp, num_hidden_layers=recipe.layers,
                           num_attention_heads=recipe.heads, image_size=recipe.image_size,
                           patch_size=recipe.patch_size),
        projection_dim=recipe.projection_dim,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = CLIPModel(config)
    pixels = _pixels([Path(image_root) / p for p in image_paths], processor)
    plain = _token_grid(tokenizer, captions, "", eos_id, recipe.context_length)  # (N, R, T)
    prefixed = _token_grid(tokenizer, captions, CLIPSCORE_PREFIX, eos_id, recipe.context_length)
    # A real token is anything up to and including the first EOS (the pad id is EOS too).
    first_eos = lambda ids: (ids == eos_id).int().argmax(-1, keepdim=True)  # noqa: E731
    plain_mask = (torch.arange(recipe.context_length) <= first_eos(plain)).long()
    prefixed_mask = (torch.arange(recipe.context_length) <= first_eos(prefixed)).long()

    num_images, num_refs = plain.shape[:2]

    def loss_of_batch(index: torch.Tensor) -> torch.Tensor:  # (B,) images, each with a reference drawn at random
        ref = torch.randint(num_refs, (len(index),), generator=generator)
        use_prefix = (torch.rand(len(index), generator=generator) < recipe.prefix_probability)[:, None]
        input_ids = torch.where(use_prefix, prefixed[index, ref], plain[index, ref])  # (B, T)
        mask = torch.where(use_prefix, prefixed_mask[index, ref], plain_mask[index, ref])
        keep = int(mask.sum(1).max())
        return model(input_ids=input_ids[:, :keep], attention_mask=mask[:, :keep], pixel_values=pixels[index],
                     return_loss=True).loss

    model.train()
    losses, steps_per_epoch = train_in_epochs(model.parameters(), num_images, recipe, loss_of_batch, generator,
                                              "toy CLIP")
    model.eval()
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    processor.save_pretrained(folder)
    report = {"train_images": num_images, "steps": len(losses), "final_loss": round(sum(losses[-steps_per_epoch:]) /
                                                                              steps_per_epoch, 4)}
    if test_file is not None and test_gt is not None:
        report.update(retrieval_report(folder, test_file, test_gt, image_root))
    return report


def retrieval_report(clip_dir: Path, test_file: Path, test_gt: Path, image_root: Path) -> dict:
    """Text-to-image R@1/R@5 (%) of the toy test references, loaded through metrics.clip_metrics.

    ``first``: each image's first reference queries the pool of all test images; ``mean``: the mean over the
    5 reference positions; ``prefixed``: the mean with CLIPScore's prefix. ``chance``: a random ranking
    (100 K / N). ``ceiling``: what a model that reads the caption perfectly but cannot tell apart images the
    caption does not distinguish would get on average (1 / (images consistent with the caption), capped at
    1, for R@1; K / that for R@K), since a terse reference such as "a red circle" fits several test images.
    """
    from metrics.clip_metrics import encode_images, load_clip, self_retrieval
    from metrics.toy_grounding import TOY_ATTRIBUTES, ToyGrammarParser

    clip = load_clip(clip_dir, "cpu")
    entries = read_json(test_file, "toy test file")
    gt = read_json(test_gt, "toy test GT file")
    parser = ToyGrammarParser(gt["toy_grammar"], str(test_gt))
    features = encode_images([Path(image_root) / e["image"] for e in entries], clip, progress=False)
    n, refs = len(entries), len(entries[0]["caption"])
    scores: dict[str, list[dict]] = {"plain": [], "prefixed": []}
    for k in range(refs):
        captions = [e["caption"][k] for e in entries]
        scores["plain"].append(self_retrieval(captions, features, clip, progress=False))
        scores["prefixed"].append(self_retrieval([CLIPSCORE_PREFIX + c for c in captions], features, clip,
                                                 progress=False))
    scenes = [e["toy_scene"] for e in entries]
    consistent = []
    for entry in entries:
        for caption in entry["caption"]:
            named = parser.mentions(caption)
            consistent.append(sum(all(scene[a] in named[a] for a in TOY_ATTRIBUTES if a in named) for scene in scenes))
    consistent_t = torch.tensor(consistent, dtype=torch.float64)

    def mean(key: str, which: str = "plain") -> float:
        return round(sum(s[key] for s in scores[which]) / refs, 1)

    return {
        "test_images": n,
        "R@1_first": round(scores["plain"][0]["R@1"], 1), "R@5_first": round(scores["plain"][0]["R@5"], 1),
        "R@1_mean": mean("R@1"), "R@5_mean": mean("R@5"),
        "R@1_prefixed_mean": mean("R@1", "prefixed"), "R@5_prefixed_mean": mean("R@5", "prefixed"),
        "R@1_chance": round(100.0 / n, 1), "R@5_chance": round(500.0 / n, 1),
        "R@1_ceiling": round(100.0 * (1.0 / consistent_t).mean().item(), 1),
        "R@5_ceiling": round(100.0 * (5.0 / consistent_t).clamp(max=1.0).mean().item(), 1),
    }


def ensure_toy_clip(folder: str | Path, toy_root: str | Path, recipe: ToyClipRecipe = ToyClipRecipe()) -> Path:
    """Build the toy CLIP into `folder` from the toy set at `toy_root`, unless it is there already; return it.

    `toy_root` is a built toy dataset (data/toy.py): its train split trains the model, its test split is
    the retrieval report's. The folder loads with `metrics.clip_metrics.load_clip` (and CLIPModel /
    AutoTokenizer / AutoImageProcessor ``from_pretrained``).
    """
    paths = toy_paths(toy_root)
    recipe_record = {"generator": GENERATOR, "format_version": FORMAT_VERSION, "recipe": dataclasses.asdict(recipe),
                     "toy_dataset": toy_dataset_manifest(paths["image_root"])}
    return ensure_built(folder, recipe_record, REQUIRED_FILES, lambda tmp: build_toy_clip(
        tmp, paths["train_file"], paths["image_root"], recipe, paths["test_file"], paths["test_gt"]))
