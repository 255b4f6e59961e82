"""Fluency: caption perplexity under GPT-2, as HF `evaluate`'s "perplexity" metric computes it.

The SMILE authors call ``evaluate.load("perplexity").compute(model_id="gpt2", predictions=captions)``.
That metric, with its defaults (``add_start_token=True``, ``batch_size=16``), does per caption:

    tokens  = tokenizer(caption, add_special_tokens=False)           # t_1..t_n, n >= 1
    input   = [BOS] + tokens                                          # BOS = <|endoftext|> for GPT-2
    ppl     = exp( mean_{i=1..n} -log p(t_i | BOS, t_1..t_{i-1}) )

and reports ``mean_perplexity``, the plain mean of the per-caption perplexities (not the
exponentiated corpus NLL, so one disfluent caption weighs as much as any other). Batches are right-
padded and the padded positions are excluded by the attention mask; since GPT-2 is causal and the
padding comes after the tokens, padding changes nothing. `evaluate` truncates only when given
``max_length``; here every caption is truncated to the model's context minus one (room for BOS),
which is what `evaluate` does with ``max_length`` = the context, and which only matters for
captions of 1,000+ tokens, where GPT-2 would otherwise fail. Truncation is logged, with a count.

This implementation calls the model directly (no `evaluate` dependency), batches captions of
similar length together, and runs in fp32.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import hub  # a hub id without network: one line at once (hub.HubError), not minutes of retries

from ._common import batch_slices, load_from_source, pad_right, resolve_device

if TYPE_CHECKING:
    from .suite import ScoringContext

logger = logging.getLogger(__name__)

DEFAULT_LM = "gpt2"


@dataclass
class LMBundle:
    """A causal language model with its tokenizer, in eval mode, fp32, on `device`."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    name: str

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def load_language_model(model_id_or_dir: str | Path | LMBundle, device: str | torch.device | None = None) -> LMBundle:
    """Load a causal LM (GPT2LMHeadModel for ``gpt2``) and its tokenizer from a hub id or a directory.

    A `LMBundle` passes through unchanged. The tokenizer must define a BOS token, which is
    prepended to every caption (GPT-2's is ``<|endoftext|>``).
    """
    if isinstance(model_id_or_dir, LMBundle):
        return model_id_or_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(model_id_or_dir)
    what = "the perplexity language model (eval.ppl_model / --ppl-model)"
    loaders = {"model": AutoModelForCausalLM.from_pretrained, "tokenizer": AutoTokenizer.from_pretrained}
    loaded = load_from_source(
        {name: functools.partial(hub.from_pretrained, loader, what=what) for name, loader in loaders.items()},
        source, "the perplexity language model", "a saved causal LM and its tokenizer",
    )
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    if tokenizer.bos_token_id is None:
        raise ValueError(f"the tokenizer of {source!r} has no BOS token; perplexity prepends one to every caption")
    device = resolve_device(device)
    return LMBundle(model.float().eval().to(device), tokenizer, device, source)


@torch.inference_mode()
def caption_perplexities(
    captions: Sequence[str],
    model_id_or_dir: str | Path | LMBundle = DEFAULT_LM,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Perplexity of each caption (see the module docstring for the definition).

    Returns:
        ``(N,)`` float64 tensor on the CPU, in input order.

    Raises:
        ValueError: a caption tokenises to nothing (the empty string); `evaluate` refuses those
            too, as no token means no likelihood. The message names their positions.
    """
    lm = load_language_model(model_id_or_dir, device)
    tokens = lm.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    empty = [i for i, t in enumerate(tokens) if len(t) == 0]
    if empty:
        raise ValueError(f"{len(empty)} captions are empty, so they have no perplexity (positions {empty[:10]})")
    limit = lm.context_length - 1
    too_long = sum(len(t) > limit for t in tokens)
    if too_long:
        logger.warning("perplexity: %d captions are longer than %d tokens and were truncated to fit %s's context",
                       too_long, limit, lm.name)
    bos = lm.tokenizer.bos_token_id
    sequences = [[bos] + t[:limit] for t in tokens]
    order = torch.argsort(torch.tensor([len(s) for s in sequences]), stable=True)
    ppl = torch.empty(len(sequences), dtype=torch.float64)
    with tqdm(total=len(sequences), desc="GPT-2 perplexity", unit="cap", disable=not progress) as bar:
        for part in batch_slices(len(sequences), batch_size):
            index = order[part]
            ids, mask = pad_right([sequences[i] for i in index.tolist()], pad_id=bos)  # (B, T)
            ids, mask = ids.to(lm.device), mask.to(lm.device)
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
            # position t predicts token t+1; BOS itself is never a target
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            target_mask = mask[:, 1:].to(nll.dtype)
            mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1)
            ppl[index] = torch.exp(mean_nll.double()).cpu()
            bar.update(len(index))
    return ppl


def gpt2_perplexity(
    captions: Sequence[str],
    model_id_or_dir: str | Path | LMBundle = DEFAULT_LM,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Mean of per-caption perplexities (`evaluate`'s ``mean_perplexity``; the paper's "PPL")."""
    if len(captions) == 0:
        raise ValueError("no captions to score: the caption list is empty")
    return caption_perplexities(captions, model_id_or_dir, batch_size, device, progress).mean().item()


def score_ppl_group(ctx: ScoringContext) -> dict[str, float]:
    """The "ppl" metric group (metrics/registry.py): `gpt2_perplexity` under the session's LM (``ctx.lm``)."""
    return {"PPL": gpt2_perplexity(ctx.captions, ctx.lm, ctx.options.ppl_batch_size, ctx.device,
                                   ctx.options.progress)}
