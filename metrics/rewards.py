"""Sequence-level rewards for self-critical training (SCST): CIDEr-D, CLIP-S, RefCLIP-S, grammar.

Rewards are metrics: captions (and images) in, one number per caption out. They live here, not in
models/, and the SCST step only calls a `RewardMixture` built from the YAML ``reward`` mapping::

    objective: {scst: {reward: {clip_s: 2.0, cider_d: 1.0}, samples: 5, baseline: greedy}}
    reward: {cider_d: {weight: 1.0, sigma: 6.0}, grammar: 1.0, clip_s: 2.0}

A reward is one class in `REWARDS` with the call ``reward(batch) -> (N,) float32 tensor``. The
SCST step scores the k samples and the greedy captions of B images in *one* call (N = B*k + B),
with ``image_index`` (N,) pointing every caption at its image row, so that each image is encoded
by CLIP once per batch and its features are gathered for its captions (the reference code does
the same with ``expand``). Subtracting the baseline is the SCST step's job (``training.steps.scst_advantages``):
the mixture is linear, so ``total(sample) - total(greedy)`` is the weighted sum of each reward's
difference, which is the grammar reward's "P(grammatical) of the sample minus the greedy's".

Definitions (CLIP-Caption-Reward, j-min; read for facts):

* ``clip_s``: ``2.5 * max(cos(image, text), 0)`` with text ``"A photo depicts " + caption``,
  truncated to CLIP's text window (77 tokens for ViT-B/32; the window of the model's config, e.g. 248 for a
  converted Long-CLIP); no references. On the 0-2.5 scale (not x100): that is the scale
  whose weight 2.0 beside CIDEr-D's 1.0 the paper tuned. Option ``long_text: chunks`` (``{clip_s: {weight: 2.0,
  long_text: chunks}}``) reads a caption over the window by pieces instead (`metrics.clip_metrics.encode_texts`).
  After each call, ``RewardMixture.last_stats["clip_truncated_share"]`` is the percent of the scored captions
  (prefixed) longer than the window, for the training log.
* ``ref_clip_s``: Hessel's RefCLIPScore per caption, the harmonic mean of the CLIP-S term and the
  best raw cosine to a (prefixed) reference (`metrics.clip_metrics.ref_clip_score_from_features`).
  CLIP-Caption-Reward's own reward instead weights and clips that text-text cosine too
  (2.5 max(cos, 0)); we keep the published RefCLIPScore, as the evaluation does.
* ``cider_d``: `metrics.cider_d.CiderD` with document frequencies from the training references.
* ``grammar``: P(grammatical) = softmax(head(pooled text features))[1], where the pooled text
  features are the CLIP text tower's output *before* the projection, for the prefixed caption, and
  the head is ``Linear(H, P, bias=False) -> ReLU -> Linear(P, 2, bias=False)`` (H text width, P
  projection width: 512 and 512 for ViT-B/32), fine-tuned by ``scripts/train_grammar_clip.py``.
  With ``grammar`` in the mixture, ``clip_s`` and ``ref_clip_s`` use that fine-tuned CLIP too,
  as in the reference (its text tower changed; its vision tower was frozen).

CLIP runs on `device` (the captioner's GPU in training); rewards come back on the CPU as float32.
"""
from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ._common import batch_slices, pad_right
from .cider_d import DEFAULT_CACHE_DIR, CiderD
from .clip_metrics import (
    CLIPSCORE_PREFIX,
    CLIPSCORE_WEIGHT,
    DEFAULT_CLIP,
    ClipBundle,
    check_long_text,
    clip_score_from_features,
    encode_images,
    encode_texts,
    load_clip,
    ref_clip_score_from_features,
    truncated_share,
)

GRAMMAR_HEAD_FILE = "grammar_head.safetensors"
GRAMMAR_CONFIG_FILE = "grammar_head.json"

ImageInput = str | Path | Image.Image


# ---------------------------------------------------------------------------------------------
# Grammar head (trained by scripts/train_grammar_clip.py, loaded by the grammar reward)
# ---------------------------------------------------------------------------------------------
class GrammarHead(torch.nn.Sequential):
    """``(N, H)`` pooled, un-projected CLIP text features -> ``(N, 2)`` logits [ungrammatical, grammatical]."""

    def __init__(self, text_width: int, projection_dim: int):
        super().__init__(
            torch.nn.Linear(text_width, projection_dim, bias=False),
            torch.nn.ReLU(),
            torch.nn.Linear(projection_dim, 2, bias=False),
        )


def tokenize_prefixed(
    tokenizer, texts: Sequence[str], prefix: str, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefix + " " + text`` tokenised, truncated to `context_length`, right-padded: (ids, mask), each (N, T)."""
    if prefix and not prefix.endswith(" "):
        prefix += " "
    ids = tokenizer([prefix + t for t in texts], truncation=True, max_length=context_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_right(ids, pad_id)


def pooled_text_features(model, tokenizer, texts: Sequence[str], prefix: str, device) -> torch.Tensor:
    """CLIP text tower output before the projection (the end-token state after the final layer norm), (N, H).

    Differentiable (the grammar training backpropagates through it); wrap in no_grad to score.
    """
    ids, mask = tokenize_prefixed(tokenizer, texts, prefix, int(model.config.text_config.max_position_embeddings))
    return model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output


def save_grammar_head(directory: str | Path, head: GrammarHead, prefix: str = CLIPSCORE_PREFIX) -> None:
    """Write the head's weights (safetensors) and sizes next to a saved CLIPModel in `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    first, last = head[0], head[2]
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, directory / GRAMMAR_HEAD_FILE)
    (directory / GRAMMAR_CONFIG_FILE).write_text(json.dumps(
        {"text_width": first.in_features, "projection_dim": first.out_features, "classes": last.out_features,
         "prefix": prefix}, indent=2), encoding="utf-8")


@dataclass
class GrammarModel:
    """A fine-tuned CLIP (`ClipBundle`) and its grammar head, on the bundle's device, eval mode."""

    clip: ClipBundle
    head: GrammarHead
    prefix: str

    @torch.no_grad()
    def probability(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """P(grammatical) of each caption, (N,) float32 on the CPU."""
        out = torch.empty(len(captions))
        for part in batch_slices(len(captions), batch_size):
            pooled = pooled_text_features(self.clip.model, self.clip.tokenizer, captions[part], self.prefix,
                                          self.clip.device)
            out[part] = self.head(pooled.float()).softmax(dim=-1)[:, 1].cpu()
        return out


def load_grammar_model(directory: str | Path, device: str | torch.device | None = None) -> GrammarModel:
    """Load what scripts/train_grammar_clip.py wrote: a CLIPModel directory plus the grammar head files."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path = directory / GRAMMAR_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"grammar reward: {config_path} not found; train one with "
                                "scripts/train_grammar_clip.py and pass its output directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    clip = load_clip(directory, device)
    width = clip.model.config.text_config.hidden_size
    if config.get("text_width") != width:
        raise ValueError(f"grammar reward: {config_path} says text_width {config.get('text_width')} but the CLIP "
                         f"in {directory} has text width {width}")
    head = GrammarHead(config["text_width"], config["projection_dim"])
    head.load_state_dict(load_file(directory / GRAMMAR_HEAD_FILE))
    return GrammarModel(clip, head.float().eval().to(clip.device), config.get("prefix", CLIPSCORE_PREFIX))


# ---------------------------------------------------------------------------------------------
# A batch to score, and the rewards
# ---------------------------------------------------------------------------------------------
@dataclass
class RewardBatch:
    """What the rewards see.

    Attributes:
        captions: N caption strings (samples and greedy captions alike).
        image_index: (N,) long, the row of each caption's image in `images` / `keys`.
        images: B image files or PIL images, or their (B, D) unit-norm CLIP features, or None
            when no reward needs images.
        keys: B reference keys (image ids), or None when no reward needs references.
    """

    captions: Sequence[str]
    image_index: torch.Tensor
    images: Sequence[ImageInput] | torch.Tensor | None = None
    keys: Sequence[Hashable] | None = None
    _image_features: dict = field(default_factory=dict, repr=False)

    def image_features(self, clip: ClipBundle) -> torch.Tensor:
        """(N, D) features of each caption's image; each of the B images is encoded once per batch per CLIP."""
        if self.images is None:
            raise ValueError("this reward needs the batch's images (paths, PIL images or CLIP features)")
        if clip.name not in self._image_features:
            if isinstance(self.images, torch.Tensor):
                features = self.images.float().cpu()
            else:
                features = encode_images(list(self.images), clip, num_workers=0, progress=False)
            self._image_features[clip.name] = features  # (B, D)
        return self._image_features[clip.name][self.image_index]

    def caption_keys(self) -> list[Hashable]:
        if self.keys is None:
            raise ValueError("this reward needs the batch's reference keys (one per image)")
        return [self.keys[i] for i in self.image_index.tolist()]


class CiderDReward:
    """CIDEr-D against the training references (`metrics.cider_d`)."""

    def __init__(self, context: "RewardContext", n: int = 4, sigma: float = 6.0):
        if context.references is None:
            raise ValueError("reward cider_d needs the training references (key -> list of captions)")
        if context.annotation_files:
            self.scorer = CiderD.from_annotation_files(context.references, context.annotation_files,
                                                       context.cache_dir, n=n, sigma=sigma)
        else:
            self.scorer = CiderD(context.references, n=n, sigma=sigma)

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return torch.from_numpy(self.scorer.score(list(batch.captions), batch.caption_keys())).float()


class ClipSReward:
    """``w * max(cos(image, "A photo depicts " + caption), 0)`` per caption.

    ``long_text``: how a prefixed caption over CLIP's text window is read (`metrics.clip_metrics.CLIP_LONG_TEXT`;
    "truncate", the reference's). ``last_stats`` holds ``clip_truncated_share``, the percent of the last call's
    captions longer than the window.
    """

    def __init__(self, context: "RewardContext", w: float = CLIPSCORE_WEIGHT, prefix: str = CLIPSCORE_PREFIX,
                 long_text: str = "truncate"):
        self.clip, self.w, self.prefix = context.clip(), float(w), prefix
        self.long_text = check_long_text(long_text, "reward option long_text")
        self.last_stats: dict[str, float] = {}

    def _caption_features(self, captions: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` unit-norm embeddings of the prefixed captions; records their truncated share."""
        text, counts = encode_texts(list(captions), self.clip, prefix=self.prefix, progress=False,
                                    long_text=self.long_text, return_token_counts=True)
        self.last_stats = {"clip_truncated_share": truncated_share(captions, self.clip, counts=counts)}
        return text

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        text = self._caption_features(batch.captions)
        return clip_score_from_features(batch.image_features(self.clip), text, self.w).float()


class RefClipSReward(ClipSReward):
    """Hessel's RefCLIPScore per caption (harmonic mean of CLIP-S and the best reference cosine)."""

    def __init__(self, context: "RewardContext", w: float = CLIPSCORE_WEIGHT, prefix: str = CLIPSCORE_PREFIX,
                 long_text: str = "truncate"):
        if context.references is None:
            raise ValueError("reward ref_clip_s needs the training references (key -> list of captions)")
        super().__init__(context, w, prefix, long_text)
        self.references = context.references

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        text = self._caption_features(batch.captions)
        # each distinct key's references are encoded once and shared by all its captions
        keys = batch.caption_keys()
        distinct = list(dict.fromkeys(keys))
        refs = [list(self.references[k]) for k in distinct]
        ref_text = encode_texts([r for rs in refs for r in rs], self.clip, prefix=self.prefix, progress=False,
                                long_text=self.long_text)
        start = torch.tensor([0] + [len(rs) for rs in refs]).cumsum(0)
        slot = {k: i for i, k in enumerate(distinct)}
        rows = [torch.arange(start[slot[k]], start[slot[k] + 1]) for k in keys]
        owner = torch.repeat_interleave(torch.arange(len(keys)), torch.tensor([len(r) for r in rows]))
        harmonic, _ = ref_clip_score_from_features(batch.image_features(self.clip), text, ref_text[torch.cat(rows)],
                                                   owner, self.w)
        return harmonic.float()


class GrammarReward:
    """P(grammatical) of each caption from the fine-tuned CLIP text tower and grammar head."""

    def __init__(self, context: "RewardContext"):
        self.model = context.grammar()

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        return self.model.probability(list(batch.captions))


REWARDS: dict[str, type] = {
    "cider_d": CiderDReward,
    "clip_s": ClipSReward,
    "ref_clip_s": RefClipSReward,
    "grammar": GrammarReward,
}


@dataclass
class RewardContext:
    """What rewards are built from; models are loaded once and shared between rewards."""

    references: Mapping[Hashable, Sequence[str]] | None = None
    annotation_files: Sequence[str | Path] | None = None  # content hash names the CIDEr-D cache
    cache_dir: str | Path = DEFAULT_CACHE_DIR
    clip_model: str | Path = DEFAULT_CLIP
    grammar_model: str | Path | None = None
    use_grammar_clip: bool = False
    device: str | torch.device | None = None
    _loaded: dict = field(default_factory=dict, repr=False)

    def grammar(self) -> GrammarModel:
        if "grammar" not in self._loaded:
            if self.grammar_model is None:
                raise ValueError("reward grammar needs grammar_model: the directory that "
                                 "scripts/train_grammar_clip.py wrote")
            self._loaded["grammar"] = load_grammar_model(self.grammar_model, self.device)
        return self._loaded["grammar"]

    def clip(self) -> ClipBundle:
        """The CLIP of clip_s / ref_clip_s: the grammar model's fine-tuned one when grammar is in the mixture."""
        if self.use_grammar_clip:
            return self.grammar().clip
        if "clip" not in self._loaded:
            self._loaded["clip"] = load_clip(self.clip_model, self.device)
        return self._loaded["clip"]


def _reward_options(name: str) -> list[str]:
    import inspect

    return [p for p in inspect.signature(REWARDS[name].__init__).parameters if p not in ("self", "context")]


def parse_reward_spec(spec: str | Mapping, key: str = "reward") -> list[tuple[str, float, dict]]:
    """The YAML ``reward`` value -> ``[(name, weight, options)]``, checked against `REWARDS` and each reward's
    options without building anything (``utils.parse_weighted_spec``); ``key`` is the config key named in errors.
    Weights may be negative (a penalty)."""
    from utils import parse_weighted_spec

    return parse_weighted_spec(spec, "reward", {name: _reward_options(name) for name in REWARDS}, key=key)


class RewardMixture:
    """A weighted sum of registered rewards, built from the YAML ``reward`` mapping.

    Accepted forms: ``cider_d`` (one reward, weight 1), ``{clip_s: 2.0, cider_d: 1.0}``, or
    ``{cider_d: {weight: 1.0, sigma: 6.0}}``. Keyword arguments are the `RewardContext` fields.

    Calling it returns ``(total (N,), {name: unweighted (N,)})``, float32 on the CPU. ``last_stats`` then holds
    the rewards' statistics of that call (``clip_truncated_share`` with a CLIP reward), for the log.
    """

    def __init__(self, spec: str | Mapping, **context):
        parsed = parse_reward_spec(spec)
        self.context = RewardContext(**context, use_grammar_clip=any(name == "grammar" for name, _, _ in parsed))
        self.components = [(name, weight, REWARDS[name](self.context, **options)) for name, weight, options in parsed]
        self.last_stats: dict[str, float] = {}

    def __call__(
        self,
        captions: Sequence[str],
        image_index: torch.Tensor | Sequence[int],
        images: Sequence[ImageInput] | torch.Tensor | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score N captions; `image_index` (N,) maps each to one of the B `images` / `keys`."""
        image_index = torch.as_tensor(image_index, dtype=torch.long).cpu()
        if image_index.shape != (len(captions),):
            raise ValueError(f"image_index must have shape ({len(captions)},), got {tuple(image_index.shape)}")
        rows = len(images) if images is not None else len(keys) if keys is not None else None
        if rows is not None and len(image_index) and (image_index.min() < 0 or image_index.max() >= rows):
            raise ValueError(f"image_index values must lie in [0, {rows}), got range "
                             f"[{image_index.min().item()}, {image_index.max().item()}]")
        batch = RewardBatch(captions, image_index, images, keys)
        parts = {name: reward(batch) for name, _, reward in self.components}
        total = sum(weight * parts[name] for name, weight, _ in self.components)
        # clip_s and ref_clip_s read the same prefixed captions: their shares agree, one entry is enough
        self.last_stats = {key: value for _, _, reward in self.components
                           for key, value in getattr(reward, "last_stats", {}).items()}
        return total, parts

    def __repr__(self) -> str:
        return "RewardMixture(" + ", ".join(f"{name}={weight:g}" for name, weight, _ in self.components) + ")"


__all__ = ["REWARDS", "GrammarHead", "GrammarModel", "RewardBatch", "RewardContext", "RewardMixture",
           "load_grammar_model", "parse_reward_spec", "pooled_text_features", "save_grammar_head",
           "tokenize_prefixed"]
