"""The toy study's VLM: a tiny LLaVA (``LlavaForConditionalGeneration``) pre-trained on the toy train split.

It is the ``model.family: vlm`` stand-in for a real image-text-to-text model (SmolVLM, Qwen2-VL, LLaVA), so that
the family's configs (configs/toy/vlm_*.yaml) run offline and the toy study gets rows for it. Its parts:

* **Vision tower:** the toy CLIP's (toy_pretrained/clip.py, built first when missing): 64 px, 8 px patches, so
  64 patch tokens after LLaVA's "default" strategy drops CLS; its image processor is the processor's.
* **Projector:** LLaVA's two-layer GELU MLP from the vision width to the LM width.
* **Language model:** a tiny Llama, randomly initialised.
* **Tokenizer:** word level over the toy captions' words plus the prompt's (``_build.word_level_tokenizer``),
  with LLaVA's ``<image>`` and an ``<end_of_turn>`` token. A chat template writes
  ``user <image> describe this image . <end_of_turn> assistant`` (plus the answer and ``<end_of_turn>`` for an
  assistant turn), so the family takes its documented chat-template path and ends captions at the end of turn.

Pre-training (`ToyVlmRecipe`) is caption MLE with everything trainable, through ``models.vlm_captioner`` itself
(its prompt, its caption layout, its targets), on every train reference: the same starting point the toy BLIP rows
have, an MLE captioner that writes the references' typical terse caption. The build scores greedy captions of the
val split (length, colour + shape right, any attribute wrong) and stores them in ``manifest.json`` (``report``).
The folder is an ordinary transformers folder: ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``
load it, and ``Captioner.from_pretrained`` reads it as a ``vlm`` captioner.

Cost: about 2 minutes on the 2-core development CPU (see docs/toy_study.md).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from data.toy import toy_paths

from ._build import EOS, FORMAT_VERSION, UNK, ensure_built, read_json, save_tokenizer, toy_dataset_manifest, \
    toy_references, toy_words, train_in_epochs, word_level_tokenizer
from .clip import ToyClipRecipe, ensure_toy_clip

logger = logging.getLogger(__name__)

GENERATOR = "smile-toy-vlm"
# The processor's files differ between transformers 4.x (preprocessor_config.json) and 5.x (processor_config.json).
REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json")
PAD, IMAGE, END_OF_TURN = "<pad>", "<image>", "<end_of_turn>"
PROMPT_WORDS = ("user", "assistant", "describe", "this", "image", ".")
# One turn per message: "role <image> text <end_of_turn> ", then "assistant" as the generation prompt.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}{% for c in m['content'] %}{% if c['type'] == 'image' %} "
                 "<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %} <end_of_turn> {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


@dataclasses.dataclass(frozen=True)
class ToyVlmRecipe:
    """Architecture and pre-training of the toy VLM (all of it goes into the manifest). The vision tower's
    shape is the toy CLIP's (its own recipe, recorded as ``clip``)."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    max_positions: int = 128
    caption_tokens: int = 24
    # Val colour + shape right after pre-training, over the recipes tried (one run each, docs/toy_study.md):
    # 4 epochs of batch 32 at lr 5e-4: 88 %; lr 1e-3: 72 %; 3 epochs: 82 %; batch 64 at 5e-4 / 1e-3 / 2e-3: 75 /
    # 79 / 38 %.
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0


def toy_vlm_processor(clip_dir: Path, words: list[str], context_length: int):
    """The LlavaProcessor: the toy CLIP's image processor, the word-level tokenizer, the chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = word_level_tokenizer(words, [PAD, EOS, UNK], add_bos_eos=False, model_max_length=context_length,
                                     bos=None, eos=EOS, pad=PAD, model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_tokens([IMAGE, END_OF_TURN], special_tokens=True)
    image_processor = CLIPImageProcessor.from_pretrained(clip_dir)
    vision = read_json(Path(clip_dir) / "config.json", "toy CLIP config")["vision_config"]
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def toy_vlm_model(clip_dir: Path, tokenizer, recipe: ToyVlmRecipe):
    """LLaVA with the toy CLIP's vision tower (its trained weights), a fresh projector and a fresh tiny Llama."""
    from transformers import CLIPModel, LlavaConfig, LlavaForConditionalGeneration

    clip = CLIPModel.from_pretrained(clip_dir)
    ids = dict(zip((PAD, EOS, IMAGE, END_OF_TURN), tokenizer.convert_tokens_to_ids([PAD, EOS, IMAGE, END_OF_TURN])))
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=recipe.width,
                intermediate_size=recipe.mlp, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                num_key_value_heads=recipe.heads, max_position_embeddings=recipe.max_positions,
                pad_token_id=ids[PAD], bos_token_id=ids[EOS], eos_token_id=ids[END_OF_TURN],
                tie_word_embeddings=False)
    config = LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=text,
                         image_token_index=ids[IMAGE], vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False)
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    # LLaVA's vision tower is a CLIPVisionModel: CLIPModel's vision_model is its vision_model in transformers 4.x
    # and the tower itself in 5.x.
    tower = model.get_submodule("model.vision_tower")
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict())
    model.generation_config.eos_token_id = ids[END_OF_TURN]
    model.generation_config.pad_token_id = ids[PAD]
    model.generation_config.bos_token_id = ids[EOS]
    return model


def _pixel_table(image_paths: list[str], image_root: Path, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct image through ``transform`` once: pixels (N, 3, S, S), and each path's row (len(paths),)."""
    from imaging import open_rgb

    distinct = list(dict.fromkeys(image_paths))
    row_of = {path: row for row, path in enumerate(distinct)}
    pixels = torch.stack([transform(open_rgb(Path(image_root) / path)) for path in distinct])
    return pixels, torch.tensor([row_of[path] for path in image_paths])


def build_toy_vlm(folder: Path, clip_dir: Path, paths: dict, recipe: ToyVlmRecipe) -> dict:
    """Pre-train the toy VLM and save model and processor into `folder`; returns the report."""
    import torch.nn.functional as F

    from models.objectives import IGNORE_INDEX
    from models.vlm_captioner import DEFAULT_PROMPT, VlmCaptioner

    image_paths, captions = toy_references(paths["train_file"], "toy train file")
    words = sorted(set(toy_words(captions)) | set(PROMPT_WORDS))
    processor = toy_vlm_processor(clip_dir, words, recipe.max_positions)
    model = toy_vlm_model(clip_dir, processor.tokenizer, recipe)
    captioner = VlmCaptioner(model, processor, prompt=DEFAULT_PROMPT, max_text_length=recipe.caption_tokens,
                             source=str(folder))
    pixels, image_rows = _pixel_table(image_paths, paths["image_root"], captioner.eval_transform())

    generator = torch.Generator().manual_seed(recipe.seed)

    def loss_of_batch(index: torch.Tensor) -> torch.Tensor:  # (B,) references
        input_ids, mask = captioner.tokenize([captions[i] for i in index.tolist()])
        targets = captioner.build_targets(input_ids, mask)
        logits = captioner(pixels[image_rows[index]], input_ids, mask)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    captioner.train()
    losses, steps_per_epoch = train_in_epochs(captioner.parameters(), len(captions), recipe, loss_of_batch,
                                              generator, "toy VLM", max_grad_norm=1.0)
    captioner.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_tokenizer(processor.tokenizer, folder)
    report = {"train_captions": len(captions), "steps": len(losses),
              "final_loss": round(sum(losses[-steps_per_epoch:]) / steps_per_epoch, 4)}
    report.update(val_report(captioner, paths))
    return report


@torch.no_grad()
def val_report(captioner, paths: dict, batch_size: int = 100) -> dict:
    """Greedy captions of the val images: mean length in words, and the toy grounding's colour + shape right and
    any attribute wrong (%), with one example."""
    from metrics.toy_grounding import toy_grounding

    entries = read_json(paths["val_file"], "toy val file")
    grammar = read_json(paths["val_gt"], "toy val GT file")["toy_grammar"]
    image_paths = [entry["image"] for entry in entries]
    pixels, _ = _pixel_table(image_paths, paths["image_root"], captioner.eval_transform())
    generated = []
    for start in range(0, len(pixels), batch_size):
        generated += captioner.generate(pixels[start:start + batch_size], num_beams=1, max_length=20)
    grounding = toy_grounding(generated, [entry["toy_scene"] for entry in entries], grammar, str(paths["val_gt"]))
    return {"val_images": len(generated),
            "val_greedy_length": round(sum(len(c.split()) for c in generated) / len(generated), 2),
            "val_colour_shape_right": round(grounding["ground_colour_shape"], 1),
            "val_any_attribute_wrong": round(grounding["ground_any_wrong"], 1),
            "val_example": generated[0]}


def ensure_toy_vlm(folder: str | Path, toy_root: str | Path, recipe: ToyVlmRecipe = ToyVlmRecipe(),
                   clip_recipe: ToyClipRecipe | None = None) -> Path:
    """Build the toy VLM into `folder` from the toy set at `toy_root`, unless it is there already; return it.

    Its vision tower is the toy CLIP (of ``clip_recipe``, by default ``ToyClipRecipe()``) in ``toy_clip`` beside `folder`, the folder the toy
    configs' metrics use, built first when missing; that CLIP's manifest is part of this recipe, so a rebuilt CLIP
    means a rebuilt VLM.
    """
    paths = toy_paths(toy_root)
    clip_dir = ensure_toy_clip(Path(folder).absolute().parent / "toy_clip", toy_root,
                               clip_recipe or ToyClipRecipe())
    clip_manifest = read_json(clip_dir / "manifest.json", "toy CLIP manifest")
    recipe_record = {"generator": GENERATOR, "format_version": FORMAT_VERSION, "recipe": dataclasses.asdict(recipe),
                     "toy_dataset": toy_dataset_manifest(paths["image_root"]),
                     "clip": {key: clip_manifest.get(key) for key in ("generator", "format_version", "recipe")}}
    return ensure_built(folder, recipe_record, REQUIRED_FILES,
                        lambda tmp: build_toy_vlm(tmp, clip_dir, paths, recipe))
