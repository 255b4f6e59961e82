"""Fine-tune a CLIP text tower plus a grammar head, for the SCST ``grammar`` reward.

    python scripts/train_grammar_clip.py --config configs/grammar_clip/toy.yaml      # toy: about a minute on CPU
    python scripts/train_grammar_clip.py --clip-model openai/clip-vit-base-patch32 \\
        --annotations data/coco_karpathy_train.json --image-root data/coco --out runs/grammar_clip --max-steps 20000

As in CLIP-Caption-Reward (j-min; ``retrieval/`` and ``captioning/utils/clipscore.py``): each step takes B
(image, caption) pairs and one corrupted copy of every caption (one random edit: repeat an n-gram, remove
an n-gram, insert random words, replace words by random words, or shuffle the words). The loss is CLIP's
symmetric contrastive loss on the real pairs plus the cross-entropy of the grammar head (real = 1,
corrupted = 0) on the text tower's pooled features before the projection, every text prefixed with
"A photo depicts". The vision tower and its projection stay frozen, so image features are unchanged and
the CLIP-S reward may use this model's text tower with the original image features; CLIP's temperature
(``logit_scale``) stays at its pre-trained value too.

Writes ``--out``: the CLIPModel, tokenizer and image processor (loadable by `metrics.clip_metrics.load_clip`),
``grammar_head.safetensors`` + ``grammar_head.json`` (loaded by `metrics.rewards.load_grammar_model`) and
``train_log.json`` (losses and grammar accuracy on held-out corrupted captions).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from data.captions import pre_caption  # noqa: E402
from data.datasets import load_annotations  # noqa: E402
from imaging import open_rgb  # noqa: E402
from metrics.clip_metrics import CLIPSCORE_PREFIX, load_clip  # noqa: E402
from metrics.rewards import GrammarHead, pooled_text_features, save_grammar_head  # noqa: E402

logger = logging.getLogger("train_grammar_clip")

DEFAULTS = {
    "clip_model": "openai/clip-vit-base-patch32",
    "annotations": None,       # BLIP-format train file(s): [{"image": relative path, "caption": str | [str]}]
    "image_root": None,
    "toy_root": None,          # instead of annotations/image_root: build/use the toy set here
    "output_dir": "runs/grammar_clip",
    "batch_size": 64,
    "lr": 1.0e-5,
    "head_lr": 1.0e-3,
    "weight_decay": 0.01,
    "max_steps": 1000,
    "eval_pairs": 256,         # captions held out to measure real-vs-corrupted accuracy
    "seed": 0,
    "device": None,
    "prefix": CLIPSCORE_PREFIX,
    "log_every": 20,
}


# ---------------------------------------------------------------------------------------------
# Corruptions: one random edit per caption
# ---------------------------------------------------------------------------------------------
def repeat_ngram(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """Insert 1-3 extra copies of a random 1-3-gram at random positions."""
    n = rng.randint(1, min(3, len(words)))
    start = rng.randint(0, len(words) - n)
    gram, out = words[start:start + n], list(words)
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(out))
        out[at:at] = gram
    return out


def remove_ngram(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """Delete a random 1-3-gram (never every word)."""
    if len(words) < 2:
        return list(words)
    n = rng.randint(1, min(3, len(words) - 1))
    start = rng.randint(0, len(words) - n)
    return words[:start] + words[start + n:]


def insert_words(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """Insert 1-3 random vocabulary words at random positions."""
    out = list(words)
    for _ in range(rng.randint(1, 3)):
        out.insert(rng.randint(0, len(out)), rng.choice(vocab))
    return out


def replace_words(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """Replace 1-3 random positions by a different random vocabulary word (the reference calls it swap)."""
    out = list(words)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        choices = [w for w in (rng.choice(vocab) for _ in range(8)) if w != out[at]]
        if choices:
            out[at] = choices[0]
    return out


def shuffle_words(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    out = list(words)
    rng.shuffle(out)
    return out


CORRUPTIONS = {"repeat": repeat_ngram, "remove": remove_ngram, "insert": insert_words, "swap": replace_words,
               "shuffle": shuffle_words}


def corrupt(caption: str, rng: random.Random, vocab: list[str], tries: int = 10) -> str:
    """One random edit of `caption` that changes it (retried up to `tries` times, then insert, which always does)."""
    words = caption.split()
    if not words:
        return rng.choice(vocab)
    for _ in range(tries):
        out = CORRUPTIONS[rng.choice(sorted(CORRUPTIONS))](words, rng, vocab)
        if out != words:
            return " ".join(out)
    return " ".join(insert_words(words, rng, vocab))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def read_pairs(config: dict) -> tuple[list[tuple[Path, str]], Path]:
    if config["toy_root"]:
        from data.toy import ensure_toy_dataset

        paths = ensure_toy_dataset(config["toy_root"])
        files, root = [paths["train_file"]], paths["image_root"]
    else:
        if not config["annotations"] or not config["image_root"]:
            raise ValueError("give annotations and image_root (or toy_root)")
        files = config["annotations"] if isinstance(config["annotations"], list) else [config["annotations"]]
        root = Path(config["image_root"])
    pairs = []
    for file in files:
        for entry in load_annotations(file):
            for raw in [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]:
                caption = pre_caption(raw, max_words=None)
                if caption:
                    pairs.append((root / entry["image"], caption))
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 (image, caption) pairs, found {len(pairs)} in {files}")
    return pairs, root


def train(config: dict) -> dict:
    rng = random.Random(config["seed"])
    torch.manual_seed(config["seed"])
    pairs, _ = read_pairs(config)
    rng.shuffle(pairs)
    num_held = min(config["eval_pairs"], len(pairs) // 4)
    held_out, pairs = pairs[:num_held], pairs[num_held:]
    vocab = sorted({w for _, c in pairs for w in c.split()})
    # a batch holds distinct images, so the contrastive loss has no duplicate image among its negatives
    by_image: dict[Path, list[str]] = {}
    for path, caption in pairs:
        by_image.setdefault(path, []).append(caption)
    image_paths = sorted(by_image)

    if config["toy_root"]:  # the toy CLIP stand-in is built on first use, as the toy training flow builds it
        from toy_pretrained import ensure_for_config

        ensure_for_config({"data": {"toy": True, "toy_root": config["toy_root"]},
                           "eval": {"metrics": ["clipscore"], "clip_model": config["clip_model"]}})
    clip = load_clip(config["clip_model"], config["device"])
    model, device = clip.model, clip.device
    for module in (model.vision_model, model.visual_projection):
        module.requires_grad_(False)
    text_params = [p for name, p in model.named_parameters() if p.requires_grad and name != "logit_scale"]
    head = GrammarHead(model.config.text_config.hidden_size, model.config.projection_dim).to(device)
    optimizer = torch.optim.AdamW([{"params": text_params, "lr": config["lr"]},
                                   {"params": head.parameters(), "lr": config["head_lr"]}],
                                  weight_decay=config["weight_decay"])
    batch_size = min(config["batch_size"], len(image_paths))
    log = []
    for step in range(1, config["max_steps"] + 1):
        model.text_model.train()
        chosen = rng.sample(image_paths, batch_size)
        batch = [(path, rng.choice(by_image[path])) for path in chosen]
        images = [open_rgb(path) for path, _ in batch]
        pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        with torch.no_grad():
            pooled_image = model.vision_model(pixel_values=pixels).pooler_output
            image_feat = F.normalize(model.visual_projection(pooled_image), dim=-1)  # (B, P)
        captions = [c for _, c in batch]
        negatives = [corrupt(c, rng, vocab) for c in captions]
        pooled = pooled_text_features(model, clip.tokenizer, captions + negatives, config["prefix"], device)  # (2B, H)
        text_feat = F.normalize(model.text_projection(pooled[:batch_size]), dim=-1)
        logits = model.logit_scale.exp().detach() * text_feat @ image_feat.T  # (B, B) text x image
        target = torch.arange(batch_size, device=device)
        clip_loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).long().to(device)
        grammar_logits = head(pooled)
        grammar_loss = F.cross_entropy(grammar_logits, labels)
        loss = clip_loss + grammar_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (grammar_logits.argmax(-1) == labels).float().mean().item()
        log.append({"step": step, "clip_loss": clip_loss.item(), "grammar_loss": grammar_loss.item(),
                    "grammar_acc": accuracy})
        if step % config["log_every"] == 0 or step == config["max_steps"]:
            logger.info("step %d clip_loss %.4f grammar_loss %.4f grammar_acc %.3f", step, clip_loss.item(),
                        grammar_loss.item(), accuracy)

    model.eval()
    head.eval()
    with torch.no_grad():
        real = [c for _, c in held_out]
        fake = [corrupt(c, rng, vocab) for c in real]
        pooled = pooled_text_features(model, clip.tokenizer, real + fake, config["prefix"], device)
        prob = head(pooled).softmax(-1)[:, 1].cpu()
    held = {"held_out_pairs": len(real),
            "held_out_acc": ((prob[:len(real)] > 0.5).float().sum() + (prob[len(real):] <= 0.5).float().sum()).item()
            / max(2 * len(real), 1),
            "mean_p_real": prob[:len(real)].mean().item(), "mean_p_corrupted": prob[len(real):].mean().item()}
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    clip.tokenizer.save_pretrained(out)
    clip.image_processor.save_pretrained(out)
    save_grammar_head(out, head.cpu(), config["prefix"])
    summary = {"config": config, **held, "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info("wrote %s (held-out real-vs-corrupted accuracy %.3f)", out, held["held_out_acc"])
    return summary


def parse_config(argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML with any of: " + ", ".join(DEFAULTS))
    parser.add_argument("--clip-model")
    parser.add_argument("--annotations", nargs="+")
    parser.add_argument("--image-root")
    parser.add_argument("--toy-root")
    parser.add_argument("--out", dest="output_dir")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    config = dict(DEFAULTS)
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"{args.config}: unknown key(s) {unknown}; valid keys: {sorted(DEFAULTS)}")
        config.update(loaded)
    config.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return config


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return train(parse_config(argv))


if __name__ == "__main__":
    main()
