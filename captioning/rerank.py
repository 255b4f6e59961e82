"""Best-of-N captions by CLIP-S: generate N candidates per image (``Captioner.caption_candidates``), keep the one
CLIP finds closest to its image.

This is how LAION-COCO picked its captions (BLIP candidates re-ranked by CLIP). The score is CLIPScore's per-image
term as ``metrics/clip_metrics.py`` defines it, ``w * max(cos(image, "A photo depicts " + caption), 0)`` with
w = 2.5 (Hessel et al. 2021; 0-2.5 scale, the metric's ``per_caption`` values, not x100), computed with that
module's own loading, preprocessing, tokenisation and embedding code, so that the score written beside a caption
is the value ``eval_caption.py``'s CLIPScore would give that caption, and any CLIP folder or hub id that the
metric takes works here, the toy CLIP (``cache/toy_clip``, toy_pretrained/clip.py) included.

Ties (equal scores; in practice candidates that are the same text, or all below cosine 0, where CLIP-S clips to
0) go to the earliest candidate, which for beam candidates is the beam search's own best: re-ranking then changes
nothing unless CLIP strictly prefers another caption.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from metrics.clip_metrics import (CLIPSCORE_PREFIX, CLIPSCORE_WEIGHT, ClipBundle, clip_score_from_features,
                                  encode_images, encode_texts, load_clip)


def rerank_by_clip(images: list[Image.Image], candidates: list[list[str]], clip_model: str | Path | ClipBundle,
                   device: str | torch.device | None = None, batch_size: int = 64) -> tuple[list[str], list[float]]:
    """Per image, the candidate caption with the highest CLIP-S, and that score.

    Args:
        images: I PIL images (any mode; converted to RGB as the metric does).
        candidates: I non-empty lists of captions, ``candidates[i]`` for ``images[i]``; lists may differ in length.
        clip_model: a CLIP hub id or folder (``eval.clip_model``, ``--clip-model``), or a loaded ``ClipBundle``;
            a path is loaded once per (path, device) and kept, so calling this once per batch costs no reload.
        device: where CLIP runs (default CUDA when available); ignored for a ``ClipBundle``.
        batch_size: images per CLIP pass; all candidates of those images are embedded in one text forward
            (each distinct text once).

    Returns:
        ``(captions, scores)``: I chosen captions and their CLIP-S, ``w * max(cos, 0)`` in [0, 2.5], floats equal
        to ``metrics.clip_metrics.clip_score([caption], [image], clip)["per_caption"]`` (up to the float rounding of
        batching texts differently).

    Raises:
        ValueError: lengths differ, an image has no candidates, a candidate is not a string, or ``batch_size`` < 1;
            the message names the image index.
    """
    if len(images) != len(candidates):
        raise ValueError(f"rerank_by_clip: got {len(images)} images but {len(candidates)} candidate lists")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"rerank_by_clip: batch_size must be an integer >= 1, got {batch_size!r}")
    for index, texts in enumerate(candidates):
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError(f"rerank_by_clip: image {index} needs a non-empty list of candidate captions, got "
                             f"{texts!r}")
        if not all(isinstance(text, str) for text in texts):
            raise ValueError(f"rerank_by_clip: image {index}'s candidates must be strings, got {texts!r}")
    clip = clip_model if isinstance(clip_model, ClipBundle) else _cached_clip(str(clip_model), _device_key(device))
    chosen: list[str] = []
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        part_images = images[start : start + batch_size]
        part_candidates = candidates[start : start + batch_size]
        best, best_scores = _best_candidates(part_images, part_candidates, clip)
        chosen += [texts[k] for texts, k in zip(part_candidates, best.tolist())]
        scores += best_scores.tolist()
    return chosen, scores


def candidate_scores(images: Sequence[Image.Image], candidates: Sequence[Sequence[str]],
                     clip: ClipBundle) -> torch.Tensor:
    """CLIP-S of every candidate against its image, (I, N_max) fp32 on the CPU, -inf where an image has fewer
    than N_max candidates (so ``argmax`` never picks padding). One image pass and one text pass."""
    counts = torch.tensor([len(texts) for texts in candidates])  # (I,)
    flat = [text for texts in candidates for text in texts]  # (M,) image-major
    image_features = encode_images(list(images), clip, batch_size=max(1, len(images)), num_workers=0,
                                   progress=False)  # (I, D)
    text_features = encode_texts(flat, clip, prefix=CLIPSCORE_PREFIX, batch_size=max(1, len(flat)),
                                 progress=False)  # (M, D)
    owner = torch.repeat_interleave(torch.arange(len(candidates)), counts)  # (M,) image of each candidate
    flat_scores = clip_score_from_features(image_features[owner], text_features, CLIPSCORE_WEIGHT)  # (M,)
    column = torch.arange(len(flat)) - (torch.cumsum(counts, 0) - counts)[owner]  # position within its image
    table = torch.full((len(candidates), int(counts.max())), float("-inf"))
    table[owner, column] = flat_scores
    return table


def _best_candidates(images: Sequence[Image.Image], candidates: Sequence[Sequence[str]],
                     clip: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """(I,) index of each image's best candidate (the first on a tie: ``argmax`` returns the first maximum) and
    (I,) its score."""
    table = candidate_scores(images, candidates, clip)
    best = table.argmax(dim=1)
    return best, table.gather(1, best[:, None]).squeeze(1)


def _device_key(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


@functools.lru_cache(maxsize=2)
def _cached_clip(source: str, device: str) -> ClipBundle:
    """``load_clip`` kept per (source, device): caption_images.py re-ranks batch after batch with one CLIP."""
    return load_clip(source, device)
