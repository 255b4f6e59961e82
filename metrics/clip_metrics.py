"""CLIP-based descriptiveness metrics: self-retrieval R@K, CLIPScore and RefCLIPScore.

Definitions (the SMILE authors' choices, CLIP ViT-B/32 = ``openai/clip-vit-base-patch32``):

* **Self-retrieval R@K** -- each generated caption, as it is (no prompt prefix), queries a pool
  of images, text to image, by cosine similarity of L2-normalised CLIP embeddings. The caption's
  own image has rank r = number of pool images with a *strictly greater* similarity; R@K is
  100 x the fraction of captions with r < K. Ties therefore resolve in the caption's favour, which
  makes the result independent of pool order (exact ties only happen with duplicate images).
* **CLIPScore** (Hessel et al. 2021) -- 100 x mean over images of ``w * max(cos(image, text), 0)``
  with w = 2.5 and text = ``"A photo depicts " + caption``.
* **RefCLIPScore** -- 100 x mean over images of the harmonic mean of that per-image CLIPScore term
  and ``max over references of cos(candidate, reference)`` (raw cosine: no weight, no clipping),
  references carrying the same prefix, as in Hessel's reference code. Where both terms are 0 the
  harmonic mean is taken as 0 (Hessel's code divides 0 by 0 there).

Long texts (``long_text`` / ``MetricOptions.clip_long_text``, `CLIP_LONG_TEXT`):

* ``"truncate"`` (the default, and the paper's metrics) -- text is truncated to the model's text window
  (`ClipBundle.context_length`: ``config.text_config.max_position_embeddings``, 77 for ViT-B/32, 248 for Long-CLIP
  converted to the transformers layout) by the tokenizer, as Hessel's ``clip.tokenize(truncate=True)`` does: the
  first ``window - 2`` text tokens between start and end tokens. The window comes from the model, never from the
  tokenizer's ``model_max_length`` (77 in OpenAI's tokenizer files, also when they sit beside a Long-CLIP).
* ``"chunks"`` -- a text longer than the window is cut into pieces that fit (`split_long_texts`: consecutive
  sentences packed up to the window, a sentence longer than the window split into runs of words); every piece
  is embedded and the text's embedding is the L2-normalised mean of its pieces' unit embeddings. Texts that fit
  are embedded as with "truncate" (the same tokens). Every metric then reads that one embedding unchanged.

Whichever mode, the dicts of `self_retrieval`, `clip_score` and `ref_clip_score` (and the metric groups) report
the share of captions longer than the window (`truncated_share`, percent): the captions "truncate" cut, and the
ones "chunks" scored by pieces. Embeddings are computed in fp32, in batches, on `device` (CUDA when available).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from imaging import open_rgb, to_rgb

from ._common import MetricInputError, MetricInputNotFound, batch_slices, hf_features, load_from_source, pad_right, \
    resolve_device, usable_cores

if TYPE_CHECKING:
    from .suite import PreparationContext, ScoringContext

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIPSCORE_PREFIX = "A photo depicts"
CLIPSCORE_WEIGHT = 2.5
# The retrieval group's keys: `retrieval_from_features`'s with the default ks, then the share of captions cut.
RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "retrieval_pool", "retrieval_truncated_share")
CLIPSCORE_KEYS = ("CLIPScore", "RefCLIPScore", "clip_truncated_share")  # the clipscore group's keys
CLIP_LONG_TEXT = ("truncate", "chunks")  # how a text longer than CLIP's window is read (module docstring)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

ImageInput = str | Path | Image.Image


@dataclass
class ClipBundle:
    """A CLIP model with its tokenizer and image processor, in eval mode, fp32, on `device`."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    device: torch.device
    name: str

    @property
    def context_length(self) -> int:
        """Text positions the model has, special tokens included (77 for OpenAI CLIP, 248 for Long-CLIP): the text
        window. Read from the model's config, not from ``tokenizer.model_max_length``, so that a CLIP with a longer
        window that ships OpenAI's tokenizer files (model_max_length 77) reads its whole window."""
        return int(self.model.config.text_config.max_position_embeddings)


def load_clip(model_id_or_dir: str | Path | ClipBundle, device: str | torch.device | None = None) -> ClipBundle:
    """Load CLIPModel + tokenizer + image processor from a hub id or a local directory.

    A `ClipBundle` passes through unchanged, so every function below accepts either.
    """
    if isinstance(model_id_or_dir, ClipBundle):
        return model_id_or_dir
    import functools

    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    import hub  # a hub id without network: one line at once (hub.HubError), not minutes of retries

    source = str(model_id_or_dir)
    what = "CLIP (eval.clip_model / --clip-model)"
    loaders = {"model": CLIPModel.from_pretrained, "tokenizer": AutoTokenizer.from_pretrained,
               "image_processor": AutoImageProcessor.from_pretrained}
    loaded = load_from_source(
        {name: functools.partial(hub.from_pretrained, loader, what=what) for name, loader in loaders.items()},
        source, "CLIP", "a saved CLIPModel, its tokenizer and its image processor",
    )
    model, tokenizer, image_processor = loaded["model"], loaded["tokenizer"], loaded["image_processor"]
    device = resolve_device(device)
    return ClipBundle(model.float().eval().to(device), tokenizer, image_processor, device, source)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """Images as RGB PIL images, read lazily so `_pixel_batches`' threads decode in parallel."""

    def __init__(self, images: Sequence[ImageInput]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        image = self.images[index]
        if isinstance(image, Image.Image):
            return to_rgb(image)
        try:
            return open_rgb(image)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read image {image}: {err}") from err


class _Preprocess:
    """The CLIP image processor over a batch of PIL images (runs in `_pixel_batches`' threads)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, batch: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=batch, return_tensors="pt")["pixel_values"]


def _pixel_batches(images: Sequence[ImageInput], image_processor, batch_size: int,
                   workers: int) -> Iterator[torch.Tensor]:
    """``(B, 3, H, W)`` pixel batches of ``images``, in order: each batch read and preprocessed (`_Images`,
    `_Preprocess`) by one of ``workers`` threads (0: in the calling thread), at most ``2 * workers`` batches ahead.

    Threads, not DataLoader worker processes: PIL decodes and resizes with the GIL released, and nothing is forked.
    `MetricSession` encodes images in a background thread while the main thread generates captions; a process
    forked then inherits whatever lock another thread holds at that instant (an import lock while the main thread
    imports a PIL plugin for its first image), and a worker that needs it waits forever: evaluations hung that way
    after "coco took ... s", with the METEOR JVM's pipes inherited by the stuck workers too. Forkserver or spawn
    workers would avoid it but import transformers afresh, 20-30 s per loader on a 2-core CPU.
    """
    dataset, preprocess = _Images(images), _Preprocess(image_processor)

    def batch(start: int) -> torch.Tensor:
        return preprocess([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])

    starts = range(0, len(dataset), batch_size)
    if workers <= 0:
        yield from map(batch, starts)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="clip-images")
    try:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.submit(batch, start))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: queued batches are dropped, running ones finish
        pool.shutdown(wait=True, cancel_futures=True)


def check_image_files(paths: Sequence[ImageInput], what: str = "image files") -> None:
    """Raise FileNotFoundError naming the missing files (count and the first ten); PIL images pass."""
    missing = [str(p) for p in paths if not isinstance(p, Image.Image) and not os.path.isfile(p)]
    if missing:
        raise MetricInputNotFound(f"{len(missing)} of {len(paths)} {what} do not exist, e.g. {missing[:10]}")


@torch.inference_mode()
def encode_images(
    images: Sequence[ImageInput],
    clip: ClipBundle | str | Path,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """L2-normalised CLIP image embeddings.

    Args:
        images: file paths or PIL images.
        clip: a `ClipBundle`, hub id or directory.
        num_workers: threads decoding and preprocessing images (`_pixel_batches`: threads, never forked
            processes); None -> min(8, usable cores) for files (decoding a COCO JPEG and resizing it takes ~7 ms
            of one core, so 5,000 images are ~35 core-seconds), 0 for in-memory PIL images or a single batch.

    Returns:
        ``(N, D)`` fp32 tensor on the CPU, rows of unit norm, in input order.
    """
    clip = load_clip(clip, device)
    check_image_files(images)
    if num_workers is None:
        on_disk = any(not isinstance(im, Image.Image) for im in images)
        num_workers = min(8, usable_cores()) if on_disk and len(images) > batch_size else 0
    batches = _pixel_batches(images, clip.image_processor, batch_size, num_workers)
    features = []
    with tqdm(total=len(images), desc="CLIP images", unit="img", disable=not progress) as bar:
        for pixels in batches:  # (B, 3, H, W)
            out = hf_features(clip.model.get_image_features(pixel_values=pixels.to(clip.device, torch.float32)))
            features.append(F.normalize(out.float(), dim=-1).cpu())
            bar.update(len(pixels))
    return torch.cat(features) if features else torch.empty(0, clip.model.config.projection_dim)


def check_long_text(mode: str, what: str = "clip_long_text") -> str:
    """``mode`` if it is one of `CLIP_LONG_TEXT`, else a ValueError naming ``what`` and the valid modes."""
    if not isinstance(mode, str) or mode not in CLIP_LONG_TEXT:
        raise ValueError(f"{what} must be one of {list(CLIP_LONG_TEXT)}, got {mode!r}")
    return mode


def _token_ids(tokenizer, texts: Sequence[str], special: bool = True) -> list[list[int]]:
    """Token ids of each text, not truncated (``verbose=False``: a text over ``model_max_length`` is expected here,
    it is what we measure)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=special, truncation=False, verbose=False)["input_ids"]


def _window_ids(texts: Sequence[str], clip: ClipBundle) -> tuple[list[list[int]], torch.Tensor]:
    """``(ids, counts)``: each text's ids cut to the model's window, and its token count before the cut ``(N,)``
    long, special tokens included.

    One tokenisation without truncation gives the counts; only the texts over the window are tokenised again, with
    the tokenizer's own truncation at ``max_length=window`` (so the end token stays last, as Hessel's
    ``clip.tokenize(truncate=True)``), whatever the tokenizer's ``model_max_length`` says.
    """
    ids = _token_ids(clip.tokenizer, texts)
    counts = torch.tensor([len(row) for row in ids], dtype=torch.long)
    over = torch.nonzero(counts > clip.context_length).flatten().tolist()
    if over:
        cut = clip.tokenizer([texts[i] for i in over], truncation=True, max_length=clip.context_length)["input_ids"]
        for row, short in zip(over, cut):
            ids[row] = short
    return ids, counts


def clip_token_counts(texts: Sequence[str], clip: ClipBundle | str | Path, prefix: str = "") -> torch.Tensor:
    """Tokens CLIP's tokenizer makes of each ``prefix + " " + text``, special tokens included, before any
    truncation: ``(N,)`` long. A count over `ClipBundle.context_length` means the text does not fit the window."""
    clip = load_clip(clip)
    return torch.tensor([len(row) for row in _token_ids(clip.tokenizer, with_prefix(texts, prefix))],
                        dtype=torch.long)


def truncated_share(texts: Sequence[str], clip: ClipBundle | str | Path, prefix: str = "",
                    counts: torch.Tensor | None = None) -> float:
    """Percent of the texts (``prefix + " " + text``) longer than the CLIP text window: the ones the "truncate"
    mode cuts (and "chunks" reads by pieces). ``counts``: their `clip_token_counts`, when already known."""
    clip = load_clip(clip)
    if counts is None:
        counts = clip_token_counts(texts, clip, prefix)
    if len(counts) == 0:
        return 0.0
    return 100.0 * (counts > clip.context_length).double().mean().item()


# A sentence ends at . ! ? or ; followed by white space, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;])\s+|\s*\n\s*")


def _pack(counts: Sequence[int], budget: int) -> list[int]:
    """Group index of each item when consecutive items are packed greedily into groups of at most ``budget`` tokens
    (an item over the budget forms a group of its own). A loop over sentences or words, never over tokens."""
    groups, group, used = [], 0, 0
    for count in counts:
        if used and used + count > budget:
            group, used = group + 1, 0
        used += count
        groups.append(group)
    return groups


def split_long_texts(texts: Sequence[str], clip: ClipBundle | str | Path, keep_prefixes: Sequence[str] = (),
                     counts: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
    """The pieces the "chunks" mode embeds: each text that fits the window is its own piece; a longer one is cut.

    A long text is split into sentences (at ``. ! ? ;`` plus white space, or a line break). Consecutive sentences
    are packed greedily into pieces of at most the window's tokens, so a piece keeps as much context as fits; a
    sentence that alone exceeds the window is split into runs of whole words packed the same way (only a single
    word longer than the window, never seen in a caption, is still cut by the tokenizer). A text that starts with
    one of ``keep_prefixes`` (then a space), e.g. CLIPScore's "A photo depicts", carries that prefix on every piece,
    so each piece is read as the metric reads a whole caption; the pieces' budget leaves room for it.

    Token counts come from one batched tokenisation of all sentences (and one of the words of too-long sentences)
    without special tokens; CLIP's tokenizer never merges across white space, so a piece's count is the sum of its
    parts' counts plus the special tokens.

    ``counts``: the texts' token counts (`clip_token_counts`), when already known.

    Returns:
        ``(pieces, owner)``: the piece strings in text order and ``(len(pieces),)`` long, the index of each piece's
        text.
    """
    clip = load_clip(clip)
    tokenizer, window = clip.tokenizer, clip.context_length
    if counts is None:
        counts = torch.tensor([len(row) for row in _token_ids(tokenizer, texts)], dtype=torch.long)
    special = len(_token_ids(tokenizer, [""])[0])  # start and end tokens (2 for CLIP)
    prefixes = sorted({p.strip() for p in keep_prefixes if p.strip()}, key=len, reverse=True)
    prefix_cost = dict(zip(prefixes, (len(row) for row in _token_ids(tokenizer, prefixes, special=False))))

    # Sentences of every long text, tokenised in one call.
    heads, sentences, sentence_text = {}, [], []
    for row in torch.nonzero(counts > window).flatten().tolist():
        text = texts[row]
        head = next((p for p in prefixes if text.startswith(p + " ")), "")
        parts = [part for part in _SENTENCE_BREAK.split(text[len(head):].strip()) if part]
        heads[row] = head
        sentences += parts
        sentence_text += [row] * len(parts)
    sentence_counts = [len(ids) for ids in _token_ids(tokenizer, sentences, special=False)]
    budget = {row: window - special - prefix_cost.get(head, 0) for row, head in heads.items()}
    if any(b < 1 for b in budget.values()):
        raise ValueError(f"split_long_texts: a prefix of {keep_prefixes} leaves no room in CLIP's {window}-token window")

    # Sentences over their budget -> words, tokenised in one call.
    too_long = [k for k, (n, row) in enumerate(zip(sentence_counts, sentence_text)) if n > budget[row]]
    words = {k: sentences[k].split() for k in too_long}
    flat_words = [w for k in too_long for w in words[k]]
    word_counts = iter([len(ids) for ids in _token_ids(tokenizer, flat_words, special=False)])

    # Units (a sentence, or a run of words of a too-long sentence) of each long text, in order, with their counts.
    units: dict[int, list[tuple[str, int]]] = {row: [] for row in heads}
    for k, (sentence, count, row) in enumerate(zip(sentences, sentence_counts, sentence_text)):
        if k not in words:
            units[row].append((sentence, count))
            continue
        sentence_words = words[k]
        counts_k = [next(word_counts) for _ in sentence_words]
        runs: dict[int, list[int]] = {}
        for index, group in enumerate(_pack(counts_k, budget[row])):
            runs.setdefault(group, []).append(index)
        units[row] += [(" ".join(sentence_words[i] for i in run), sum(counts_k[i] for i in run))
                       for run in runs.values()]

    pieces, owner = [], []
    for row, text in enumerate(texts):
        if row not in units:
            pieces.append(text)
            owner.append(row)
            continue
        grouped: dict[int, list[str]] = {}
        for (unit, _), group in zip(units[row], _pack([n for _, n in units[row]], budget[row])):
            grouped.setdefault(group, []).append(unit)
        head = heads[row] + " " if heads[row] else ""
        pieces += [head + " ".join(parts) for parts in grouped.values()]
        owner += [row] * len(grouped)
    return pieces, torch.tensor(owner, dtype=torch.long)


def _embed_ids(ids: list[list[int]], clip: ClipBundle, batch_size: int, progress: bool) -> torch.Tensor:
    """``(len(ids), D)`` unit-norm text embeddings of token-id rows (each within the window), batched in order of
    length so that each batch pads little; CLIP's text tower is causal and pools at the end token, so right padding
    does not change an embedding."""
    pad_id = clip.tokenizer.pad_token_id if clip.tokenizer.pad_token_id is not None else clip.tokenizer.eos_token_id
    order = torch.argsort(torch.tensor([len(x) for x in ids]), stable=True)
    features = torch.empty(len(ids), clip.model.config.projection_dim)
    with tqdm(total=len(ids), desc="CLIP texts", unit="text", disable=not progress) as bar:
        for part in batch_slices(len(ids), batch_size):
            index = order[part]
            input_ids, mask = pad_right([ids[i] for i in index.tolist()], pad_id)  # (B, T)
            out = hf_features(clip.model.get_text_features(
                input_ids=input_ids.to(clip.device), attention_mask=mask.to(clip.device)))
            features[index] = F.normalize(out.float(), dim=-1).cpu()
            bar.update(len(index))
    return features


@torch.inference_mode()
def encode_texts(
    texts: Sequence[str],
    clip: ClipBundle | str | Path,
    prefix: str = "",
    batch_size: int = 256,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    long_text: str = "truncate",
    keep_prefixes: Sequence[str] = (),
    return_token_counts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLIP text embeddings of ``prefix + " " + text`` (or `text` when no prefix).

    A text that occurs more than once (generated captions repeat, e.g. "a man riding a wave on top of a
    surfboard") is encoded once. Each text is tokenised once without truncation (its count, for
    `truncated_share`); then, by ``long_text`` (`CLIP_LONG_TEXT`, module docstring):

    * ``"truncate"``: a text over the window (`ClipBundle.context_length`) is cut to it;
    * ``"chunks"``: a text over the window is embedded as the normalised mean of the unit embeddings of its
      `split_long_texts` pieces (which repeat ``prefix``, or one of ``keep_prefixes`` a text starts with, on every
      piece). The pieces of all texts and the texts that fit go through the text tower together, in the same
      length-sorted batches, and one ``index_add`` sums each text's pieces. A text that fits gets exactly its
      "truncate" embedding (the same tokens, no renormalisation; bit-identical when no text in the call is long,
      else equal up to the float rounding of the other batch shapes the pieces bring).

    Returns:
        ``(N, D)`` fp32 tensor on the CPU, rows of unit norm, in input order; with ``return_token_counts`` also the
        ``(N,)`` long token counts (special tokens included, before truncation) of the texts as encoded.
    """
    clip = load_clip(clip, device)
    mode = check_long_text(long_text, "long_text")
    full = with_prefix(texts, prefix)
    if len(full) == 0:
        features = torch.empty(0, clip.model.config.projection_dim)
        return (features, torch.empty(0, dtype=torch.long)) if return_token_counts else features
    unique = list(dict.fromkeys(full))
    ids, counts = _window_ids(unique, clip)
    over = counts > clip.context_length
    if mode == "chunks" and bool(over.any()):
        long_rows = torch.nonzero(over).flatten()
        fit_rows = torch.nonzero(~over).flatten()
        pieces, piece_owner = split_long_texts([unique[i] for i in long_rows.tolist()], clip,
                                               keep_prefixes=(*keep_prefixes, prefix), counts=counts[long_rows])
        piece_ids, _ = _window_ids(pieces, clip)
        owner = torch.cat([fit_rows, long_rows[piece_owner]])  # (T + P,): the text row of each embedded string
        embedded = _embed_ids([ids[i] for i in fit_rows.tolist()] + piece_ids, clip, batch_size, progress)
        features = torch.zeros(len(unique), embedded.shape[1]).index_add_(0, owner, embedded)  # (U, D)
        features[long_rows] = F.normalize(features[long_rows], dim=-1)
    else:
        features = _embed_ids(ids, clip, batch_size, progress)
    if len(unique) < len(full):
        row = {text: k for k, text in enumerate(unique)}
        rows = torch.tensor([row[text] for text in full])
        features, counts = features[rows], counts[rows]
    return (features, counts) if return_token_counts else features


def with_prefix(texts: Sequence[str], prefix: str = "") -> list[str]:
    """The strings CLIP encodes: ``prefix + " " + text`` (no double space), or the texts as they are."""
    if prefix and not prefix.endswith(" "):
        prefix += " "  # Hessel's CLIPCapDataset does the same
    return [prefix + t for t in texts]


# ---------------------------------------------------------------------------------------------
# Self-retrieval
# ---------------------------------------------------------------------------------------------
def recall_at_k(
    similarity: torch.Tensor, target_index: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """R@K in percent from a query-by-pool similarity matrix.

    Args:
        similarity: ``(num_queries, pool)``; higher means more similar.
        target_index: ``(num_queries,)`` long, the pool column of each query's correct item.
        ks: the cut-offs.

    The rank of a query's target is the number of pool items with a strictly greater
    similarity, so a tie with the target never pushes it down (see the module docstring).

    Returns:
        ``{"R@1": %, "R@5": %, ...}``.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be (num_queries, pool), got shape {tuple(similarity.shape)}")
    _check_targets(target_index, similarity.shape[0], similarity.shape[1])
    return recall_from_ranks(_ranks(similarity, target_index.to(similarity.device)), ks)


def recall_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"R@K": 100 * mean(rank < K)}`` for 0-based ranks ``(num_queries,)``."""
    if len(ranks) == 0:
        raise ValueError("no queries: cannot compute recall over an empty set")
    return {f"R@{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}


def retrieval_ranks(
    text_features: torch.Tensor,
    image_features: torch.Tensor,
    target_index: torch.Tensor,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """0-based rank of each query's target image, computed in chunks of queries.

    Args:
        text_features: ``(Q, D)`` unit-norm query embeddings.
        image_features: ``(P, D)`` unit-norm pool embeddings.
        target_index: ``(Q,)`` long, pool row of each query's image.

    Chunking keeps memory at ``chunk_size x P`` instead of ``Q x P`` (5k x 30k floats = 600 MB).

    Returns:
        ``(Q,)`` long on the CPU.
    """
    _check_targets(target_index, text_features.shape[0], image_features.shape[0])
    device = resolve_device(device)
    pool = image_features.to(device, torch.float32)
    ranks = [
        _ranks(text_features[part].to(device, torch.float32) @ pool.T, target_index[part].to(device)).cpu()
        for part in batch_slices(len(text_features), chunk_size)
    ]
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def _ranks(similarity: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    target = similarity.gather(1, target_index[:, None])  # (Q, 1)
    return (similarity > target).sum(dim=1)


def _check_targets(target_index: torch.Tensor, num_queries: int, pool: int) -> None:
    if target_index.dim() != 1 or target_index.shape[0] != num_queries:
        raise ValueError(f"target_index must have shape ({num_queries},), got {tuple(target_index.shape)}")
    if target_index.dtype != torch.long:
        raise TypeError(f"target_index must be a LongTensor, got {target_index.dtype}")
    if num_queries and (target_index.min() < 0 or target_index.max() >= pool):
        raise ValueError(f"target_index values must lie in [0, {pool}), got range "
                         f"[{target_index.min().item()}, {target_index.max().item()}]")


def extra_pool_paths(extra: str | Path | Sequence[str | Path] | None, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """Distractor image files: a directory (its image files, sorted, not recursive) or a list.

    Files that resolve to one of `exclude` (the evaluated images) or repeat within `extra` are
    removed, with an info log giving the count, so the pool holds each image once.
    """
    if extra is None:
        return []
    if isinstance(extra, (str, Path)):
        folder = Path(extra)
        if not folder.is_dir():
            raise NotADirectoryError(f"extra pool images: {folder} is not a directory (pass a directory "
                                     "or a list of image paths)")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise MetricInputNotFound(f"extra pool images: no {'/'.join(IMAGE_EXTENSIONS)} files in {folder}")
    else:
        paths = [Path(p) for p in extra]
    check_image_files(paths, "extra pool image files")
    seen = {Path(p).resolve() for p in exclude}
    kept = []
    for path in paths:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            kept.append(path)
    if len(kept) < len(paths):
        logger.info("extra pool images: %d of %d are evaluated images or repeats and were not added twice",
                    len(paths) - len(kept), len(paths))
    return kept


def self_retrieval(
    captions: Sequence[str],
    images: Sequence[ImageInput] | torch.Tensor,
    clip: ClipBundle | str | Path,
    extra_pool_images: str | Path | Sequence[str | Path] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    long_text: str = "truncate",
) -> dict[str, float]:
    """Text-to-image self-retrieval: caption i should retrieve image i from the pool.

    Args:
        captions: N generated captions, used as they are (no prefix).
        images: the N images of those captions (paths / PIL), or their ``(N, D)`` unit-norm CLIP
            embeddings when already computed (CLIPScore needs the same ones).
        extra_pool_images: distractors added to the pool (a directory or a list of paths).
        long_text: how a caption over CLIP's text window is read (`CLIP_LONG_TEXT`).

    Returns:
        ``{"R@1": %, "R@5": %, "R@10": %, "retrieval_pool": pool size, "retrieval_truncated_share": % of captions
        longer than the text window}``.
    """
    clip = load_clip(clip, device)
    image_features = _image_features(images, clip, len(captions), batch_size, num_workers, progress)
    exclude = [] if isinstance(images, torch.Tensor) else [p for p in images if not isinstance(p, Image.Image)]
    extra = extra_pool_paths(extra_pool_images, exclude)
    if extra:
        image_features = torch.cat([image_features, encode_images(extra, clip, batch_size, num_workers, progress)])
    text_features, counts = encode_texts(captions, clip, prefix="", batch_size=text_batch_size, progress=progress,
                                         long_text=long_text, return_token_counts=True)
    return {**retrieval_from_features(text_features, image_features, ks, device=clip.device),
            "retrieval_truncated_share": truncated_share(captions, clip, counts=counts)}


def retrieval_from_features(text_features: torch.Tensor, pool_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                            device: str | torch.device | None = None) -> dict[str, float]:
    """Self-retrieval R@K from ``(N, D)`` caption embeddings and a ``(P >= N, D)`` pool whose first N rows are
    the captions' own images: ``{"R@1": %, ..., "retrieval_pool": P}``."""
    ranks = retrieval_ranks(text_features, pool_features, torch.arange(len(text_features)), device=device)
    return {**recall_from_ranks(ranks, ks), "retrieval_pool": int(pool_features.shape[0])}


# ---------------------------------------------------------------------------------------------
# CLIPScore / RefCLIPScore
# ---------------------------------------------------------------------------------------------
def clip_score_from_features(image_features: torch.Tensor, text_features: torch.Tensor,
                             w: float = CLIPSCORE_WEIGHT) -> torch.Tensor:
    """Per-pair CLIPScore term ``w * max(cos, 0)``, shape ``(N,)`` from two ``(N, D)`` tensors."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features must match, got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    cos = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)
    return w * cos.clamp(min=0)


def ref_clip_score_from_features(
    image_features: torch.Tensor,
    candidate_features: torch.Tensor,
    reference_features: torch.Tensor,
    reference_owner: torch.Tensor,
    w: float = CLIPSCORE_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption RefCLIPScore terms (Hessel's harmonic mean) and the CLIPScore terms.

    Args:
        image_features: ``(N, D)``; candidate_features: ``(N, D)``, prefixed captions.
        reference_features: ``(M, D)``, all prefixed references flattened.
        reference_owner: ``(M,)`` long, the caption index each reference belongs to; every
            caption needs at least one reference.

    Returns:
        ``(refclip (N,), clip (N,))`` in Hessel's 0-2.5 scale.
    """
    n = candidate_features.shape[0]
    _check_targets(reference_owner, reference_features.shape[0], n)
    counts = torch.bincount(reference_owner, minlength=n)
    if (counts == 0).any():
        raise ValueError(f"RefCLIPScore needs references for every caption; caption indices without any: "
                         f"{torch.nonzero(counts == 0).flatten()[:10].tolist()}")
    clip_term = clip_score_from_features(image_features, candidate_features, w)
    candidates = F.normalize(candidate_features.float(), dim=-1)
    references = F.normalize(reference_features.float(), dim=-1)
    ref_cos = (candidates[reference_owner] * references).sum(-1)  # (M,)
    best = torch.full((n,), float("-inf")).scatter_reduce(0, reference_owner, ref_cos, reduce="amax")
    total = clip_term + best
    harmonic = torch.where(total == 0, torch.zeros_like(total), 2 * clip_term * best / total)
    return harmonic, clip_term


def clip_score(
    captions: Sequence[str],
    images: Sequence[ImageInput] | torch.Tensor,
    clip: ClipBundle | str | Path,
    prefix: str = CLIPSCORE_PREFIX,
    w: float = CLIPSCORE_WEIGHT,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    long_text: str = "truncate",
) -> dict:
    """CLIPScore of N captions against their N images (paths / PIL, or ``(N, D)`` embeddings).

    ``long_text``: how a prefixed caption over CLIP's text window is read (`CLIP_LONG_TEXT`).

    Returns:
        ``{"CLIPScore": 100 * per_caption.mean(), "per_caption": (N,) tensor of w*max(cos, 0),
        "clip_truncated_share": % of prefixed captions longer than the text window}``.
    """
    clip = load_clip(clip, device)
    image_features = _image_features(images, clip, len(captions), batch_size, num_workers, progress)
    text_features, counts = encode_texts(captions, clip, prefix=prefix, batch_size=text_batch_size,
                                         progress=progress, long_text=long_text, return_token_counts=True)
    per_caption = clip_score_from_features(image_features, text_features, w)
    return {"CLIPScore": 100.0 * per_caption.double().mean().item(), "per_caption": per_caption,
            "clip_truncated_share": truncated_share(captions, clip, counts=counts)}


def ref_clip_score(
    captions: Sequence[str],
    references: Sequence[Sequence[str]],
    images: Sequence[ImageInput] | torch.Tensor,
    clip: ClipBundle | str | Path,
    prefix: str = CLIPSCORE_PREFIX,
    w: float = CLIPSCORE_WEIGHT,
    batch_size: int = 64,
    text_batch_size: int = 256,
    num_workers: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    long_text: str = "truncate",
) -> dict:
    """RefCLIPScore and CLIPScore together (the former needs the latter's per-image terms).

    Args:
        references: for each caption, its reference captions (at least one each).
        long_text: how a prefixed caption or reference over CLIP's text window is read (`CLIP_LONG_TEXT`).

    Returns:
        ``{"CLIPScore", "RefCLIPScore"}`` (x100), ``"clip_truncated_share"`` (% of the prefixed captions, not the
        references, longer than the text window), plus ``"per_caption"`` (RefCLIPScore terms) and
        ``"per_caption_clip"`` (CLIPScore terms), ``(N,)`` tensors in Hessel's 0-2.5 scale.
    """
    if len(references) != len(captions):
        raise ValueError(f"got {len(captions)} captions but {len(references)} reference lists")
    clip = load_clip(clip, device)
    image_features = _image_features(images, clip, len(captions), batch_size, num_workers, progress)
    flat = [r for refs in references for r in refs]
    owner = torch.repeat_interleave(torch.arange(len(references)), torch.tensor([len(r) for r in references]))
    text_features, counts = encode_texts(list(captions) + flat, clip, prefix=prefix, batch_size=text_batch_size,
                                         progress=progress, long_text=long_text, return_token_counts=True)
    n = len(captions)
    return {**ref_clip_score_summary(image_features, text_features[:n], text_features[n:], owner, w),
            "clip_truncated_share": truncated_share(captions, clip, counts=counts[:n])}


def ref_clip_score_summary(image_features: torch.Tensor, candidate_features: torch.Tensor,
                           reference_features: torch.Tensor, reference_owner: torch.Tensor,
                           w: float = CLIPSCORE_WEIGHT) -> dict:
    """`ref_clip_score`'s dict from embeddings (arguments as in `ref_clip_score_from_features`)."""
    harmonic, clip_term = ref_clip_score_from_features(image_features, candidate_features, reference_features,
                                                       reference_owner, w)
    return {
        "CLIPScore": 100.0 * clip_term.double().mean().item(),
        "RefCLIPScore": 100.0 * harmonic.double().mean().item(),
        "per_caption": harmonic,
        "per_caption_clip": clip_term,
    }


# ---------------------------------------------------------------------------------------------
# The "retrieval" and "clipscore" metric groups (metrics/registry.py), on the session's shared embeddings
# ---------------------------------------------------------------------------------------------
def prepare_retrieval_group(ctx: PreparationContext) -> None:
    """Encode the GT images of ``ctx.ids`` that exist now and the distractors (best effort: `score_retrieval_group`
    reports what is missing)."""
    paths = ctx.image_files()
    with contextlib.suppress(MetricInputError, OSError):
        paths += extra_pool_paths(ctx.options.extra_pool_images, exclude=paths)
    ctx.image_features(paths)


def _retrieval_pool(ctx: ScoringContext) -> list[Path]:
    """The scored images, then the distractors (listed once per `score` call)."""
    return ctx.shared("retrieval_pool", lambda: ctx.image_paths + extra_pool_paths(
        ctx.options.extra_pool_images, exclude=ctx.image_paths))


def retrieval_clip_inputs(ctx: ScoringContext) -> tuple[list[Path], list[str]]:
    """What `score_retrieval_group` embeds: the pool and the captions as they are."""
    return _retrieval_pool(ctx), ctx.captions


def score_retrieval_group(ctx: ScoringContext) -> dict[str, float]:
    """Self-retrieval R@K of the scored captions; the pool is the scored images, then the distractors. Also the
    share of captions longer than CLIP's text window (tokenised once more here: the embeddings come from the
    session's cache, shared with other groups)."""
    image_features = ctx.image_features(_retrieval_pool(ctx))  # (P, D), the scored images first
    return {**retrieval_from_features(ctx.text_features(ctx.captions), image_features, device=ctx.device),
            "retrieval_truncated_share": truncated_share(ctx.captions, ctx.clip)}


def prepare_clipscore_group(ctx: PreparationContext) -> None:
    """Encode the GT images of ``ctx.ids`` that exist now and their prefixed reference captions."""
    ctx.image_features(ctx.image_files())
    ctx.text_features(with_prefix([r for i in ctx.ids for r in ctx.references.get(i, ())], CLIPSCORE_PREFIX))


def clipscore_clip_inputs(ctx: ScoringContext) -> tuple[list[Path], list[str]]:
    """What `score_clipscore_group` embeds: the scored images, the prefixed captions, then their prefixed
    references."""
    references = [r for refs in ctx.scored_references for r in refs]
    return ctx.image_paths, with_prefix(ctx.captions, CLIPSCORE_PREFIX) + with_prefix(references, CLIPSCORE_PREFIX)


def score_clipscore_group(ctx: ScoringContext) -> dict[str, float]:
    """CLIPScore and RefCLIPScore of the scored captions (prefixed, as their references), and the share of prefixed
    captions longer than CLIP's text window."""
    references = ctx.scored_references
    paths, texts = clipscore_clip_inputs(ctx)
    features = ctx.text_features(texts)  # (N + R, D): the N candidates, then the R references
    owner = torch.repeat_interleave(torch.arange(len(references)), torch.tensor([len(r) for r in references]))
    scores = ref_clip_score_summary(ctx.image_features(paths), features[:len(ctx.captions)],
                                    features[len(ctx.captions):], owner)
    return {"CLIPScore": scores["CLIPScore"], "RefCLIPScore": scores["RefCLIPScore"],
            "clip_truncated_share": truncated_share(texts[:len(ctx.captions)], ctx.clip)}


def _image_features(images, clip: ClipBundle, n: int, batch_size: int, num_workers, progress: bool) -> torch.Tensor:
    if len(images) != n:
        raise ValueError(f"got {n} captions but {len(images)} images")
    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    return encode_images(images, clip, batch_size, num_workers, progress)
