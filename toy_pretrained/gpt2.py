"""The toy study's GPT-2: a tiny transformers `GPT2LMHeadModel` trained on the toy train captions.

It stands in for GPT-2 in the perplexity metric (metrics/perplexity.py, which prepends BOS to every caption)
and for the language model of later toy work (a ClipCap-style prefix captioner). Training is plain next-token
cross-entropy on ``BOS caption EOS`` for every train reference, so a fluent toy caption (any word order the
toy grammar writes) gets a low perplexity and a scrambled or ungrammatical one a high one; the build measures
both on the toy test references and stores them in the folder's ``manifest.json`` (``report``).

Cost: about 15 s on the 2-core development CPU (see README, Toy study).
"""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import torch

from data.toy import toy_paths

from ._build import EOS, UNK, FORMAT_VERSION, ensure_built, save_tokenizer, toy_dataset_manifest, toy_references, \
    toy_words, train_in_epochs, word_level_tokenizer

logger = logging.getLogger(__name__)

GENERATOR = "smile-toy-gpt2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class ToyGpt2Recipe:
    """Architecture and training of the toy GPT-2 (all of it goes into the manifest)."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    context_length: int = 32
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0


def build_toy_gpt2(folder: Path, train_file: Path, recipe: ToyGpt2Recipe, test_file: Path | None = None) -> dict:
    """Train the toy GPT-2 and save model and tokenizer into `folder`; returns the report."""
    from transformers import GPT2Config, GPT2LMHeadModel

    captions = toy_references(train_file, "toy train file")[1]
    tokenizer = word_level_tokenizer(toy_words(captions), [EOS, UNK], add_bos_eos=False,
                                     model_max_length=recipe.context_length, bos=EOS, eos=EOS, pad=EOS)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    ids = tokenizer(captions, add_special_tokens=False, truncation=True,
                    max_length=recipe.context_length - 2)["input_ids"]
    length = max(len(t) for t in ids) + 2
    sequences = torch.full((len(ids), length), eos_id, dtype=torch.long)  # BOS caption EOS, then padding
    labels = torch.full((len(ids), length), -100, dtype=torch.long)  # GPT2LMHeadModel shifts them itself
    for row, tokens in enumerate(ids):
        sequences[row, 1:len(tokens) + 1] = torch.tensor(tokens)
        labels[row, 1:len(tokens) + 2] = sequences[row, 1:len(tokens) + 2]
    mask = (labels != -100).long()
    mask[:, 0] = 1
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.context_length, n_embd=recipe.width,
                        n_layer=recipe.layers, n_head=recipe.heads, bos_token_id=eos_id, eos_token_id=eos_id,
                        pad_token_id=eos_id)
    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model = GPT2LMHeadModel(config)

    def loss_of_batch(index: torch.Tensor) -> torch.Tensor:
        keep = int(mask[index].sum(1).max())
        return model(input_ids=sequences[index, :keep], attention_mask=mask[index, :keep],
                     labels=labels[index, :keep]).loss

    model.train()
    losses, steps_per_epoch = train_in_epochs(model.parameters(), len(ids), recipe, loss_of_batch, generator,
                                              "toy GPT-2")
    model.eval()
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    report = {"train_captions": len(ids), "steps": len(losses),
              "final_loss": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4)}
    if test_file is not None:
        report.update(perplexity_report(folder, toy_references(test_file, "toy test file")[1], recipe.seed))
    return report


def perplexity_report(lm_dir: Path, references: list[str], seed: int = 0) -> dict:
    """Mean perplexity (metrics.perplexity, loaded from `lm_dir`) of the references and of the same words
    shuffled into a random order: fluent toy captions should score far lower."""
    from metrics.perplexity import gpt2_perplexity

    rng = random.Random(seed)
    shuffled = []
    for reference in references:
        words = reference.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    return {"test_references": len(references),
            "PPL_references": round(gpt2_perplexity(references, lm_dir, device="cpu"), 2),
            "PPL_shuffled_words": round(gpt2_perplexity(shuffled, lm_dir, device="cpu"), 2)}


def ensure_toy_gpt2(folder: str | Path, toy_root: str | Path, recipe: ToyGpt2Recipe = ToyGpt2Recipe()) -> Path:
    """Build the toy GPT-2 into `folder` from the toy set at `toy_root`, unless it is there already; return it.

    The folder loads with `metrics.perplexity.load_language_model` (AutoModelForCausalLM / AutoTokenizer).
    """
    paths = toy_paths(toy_root)
    recipe_record = {"generator": GENERATOR, "format_version": FORMAT_VERSION, "recipe": dataclasses.asdict(recipe),
                     "toy_dataset": toy_dataset_manifest(paths["image_root"])}
    return ensure_built(folder, recipe_record, REQUIRED_FILES,
                        lambda tmp: build_toy_gpt2(tmp, paths["train_file"], recipe, paths["test_file"]))
