"""Caption metrics: accuracy (pycocoevalcap) and descriptiveness (length, lexical diversity,
CLIP self-retrieval, CLIPScore, GPT-2 perplexity), as reported by the SMILE paper.

Entry points: `compute_metrics` (captions in memory, e.g. validation during training) and
`score_results_file` (a results JSON, no captioning model), both with one `MetricOptions`; `prepare_metrics` starts
the caption-independent work (models, image embeddings, reference tokens, METEOR's JVMs) before the captions exist.
Which metric groups exist, their keys, needs and compute functions: `registry.METRIC_GROUPS`. This package never
imports models/ or data/: scoring needs only captions, ground truth and images. `table` builds the SMILE-paper
markdown table; `plots` draws caption-length histograms and per-metric comparison charts (matplotlib, imported only
when a plot is drawn).
"""
from .clip_metrics import (
    CLIPSCORE_PREFIX,
    CLIPSCORE_WEIGHT,
    DEFAULT_CLIP,
    ClipBundle,
    clip_score,
    clip_score_from_features,
    encode_images,
    encode_texts,
    extra_pool_paths,
    load_clip,
    recall_at_k,
    recall_from_ranks,
    ref_clip_score,
    ref_clip_score_from_features,
    retrieval_ranks,
    self_retrieval,
)
from .coco import MeteorScorer, coco_caption_metrics, fallback_tokenize, java_available, ptb_tokenize, read_coco_gt, \
    tokenize_texts
from .perplexity import DEFAULT_LM, LMBundle, caption_perplexities, gpt2_perplexity, load_language_model
from .plots import caption_length_histogram, length_counts, metric_comparison_chart
from .registry import ALL_METRICS, DEFAULT_METRICS, METRIC_GROUPS, METRIC_KEYS, MetricGroup
from .suite import MetricOptions, MetricSession, align_results, compute_metrics, prepare_metrics, score_results_file
from .table import markdown_header, markdown_row, markdown_table
from .text_stats import caption_length, caption_lengths, caption_words, lexical_diversity, normalize_caption

__all__ = [
    "ALL_METRICS", "CLIPSCORE_PREFIX", "CLIPSCORE_WEIGHT", "DEFAULT_CLIP", "DEFAULT_LM", "DEFAULT_METRICS",
    "METRIC_GROUPS", "METRIC_KEYS", "ClipBundle", "LMBundle", "MeteorScorer", "MetricGroup", "MetricOptions",
    "MetricSession", "align_results", "caption_length",
    "caption_length_histogram", "caption_lengths", "caption_perplexities", "caption_words", "clip_score",
    "clip_score_from_features", "coco_caption_metrics", "compute_metrics", "encode_images", "encode_texts",
    "extra_pool_paths", "fallback_tokenize", "gpt2_perplexity", "java_available", "length_counts", "lexical_diversity",
    "load_clip", "load_language_model", "markdown_header", "markdown_row", "markdown_table", "metric_comparison_chart",
    "normalize_caption", "prepare_metrics", "ptb_tokenize", "read_coco_gt", "recall_at_k", "recall_from_ranks",
    "ref_clip_score", "ref_clip_score_from_features", "retrieval_ranks", "score_results_file", "self_retrieval",
    "tokenize_texts",
]
