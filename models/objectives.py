"""Caption training objectives: MLE, SMILE, the paper's subsetting ablations, and weighted mixtures.

Every objective has the signature ``fn(logits, targets, **options) -> scalar loss`` where

* ``logits``  (B, N, V) are already aligned with the targets (``logits[:, t]`` predicts ``targets[:, t]``),
* ``targets`` (B, N) hold token ids, with ``IGNORE_INDEX`` (-100) on positions that carry no loss
  (the prompt and the padding).

The loss is the mean over non-ignored positions, like ``F.cross_entropy(..., reduction='mean')``.

SMILE (Yue et al., NeurIPS 2023) restricts the softmax at each position to the vocabulary items that occur in
the row's own target caption. A prediction of a word that the caption does contain but at another position
("richness" direction) is then not penalised away, while the label still wins probability from every other
word in the caption. The reference code builds a dense (B, N, V) boolean mask and fills ``-inf``; here the
logits of each row's token set are *gathered* instead, so SMILE only touches (B, N, N) extra values and costs
no more than MLE (see ``benchmarks/bench_objectives.py``).

Add an objective by writing one function and one line in ``OBJECTIVES``. ``caption_loss`` (at the end) is the one
place where an objective is applied to a captioner, for every model family and every kind of training step.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from utils import parse_weighted_spec

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are reduced in fp32 (logsumexp over 30k items loses too much in 8 mantissa bits)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_mean(per_position: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_position`` (B, N) over ``valid`` (B, N); 0 when nothing is valid (keeps the graph)."""
    per_position = per_position.masked_fill(~valid, 0.0)
    return per_position.sum() / valid.sum().clamp(min=1)


def first_target_positions(targets: torch.Tensor) -> torch.Tensor:
    """Index of the first non-ignored position of each row, (B,). Rows with no target get 0."""
    valid = targets != IGNORE_INDEX
    return valid.int().argmax(dim=1)


def row_token_sets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's set of target tokens, as a padded (B, N) index matrix plus its (B, N) validity mask.

    The ids are sorted per row and duplicates are marked invalid, so a row with K distinct tokens has exactly K
    valid entries. Ignored positions are sorted to the end (they are negative, so they are replaced by a large
    id first) and marked invalid. Entries that are invalid hold the id 0, a safe index for ``gather``.
    """
    ignored = targets == IGNORE_INDEX
    big = torch.iinfo(targets.dtype).max
    sorted_ids, _ = targets.masked_fill(ignored, big).sort(dim=1)
    valid = sorted_ids != big
    repeat = torch.zeros_like(valid)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    valid &= ~repeat
    return sorted_ids.masked_fill(~valid, 0), valid


def mle(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy over the full vocabulary, with BLIP's label smoothing (0.1 in BLIP's decoder)."""
    return F.cross_entropy(
        _upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )


class _SubsetCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy where position (b, t) normalises over a small candidate set, with a hand-written backward.

    Autograd through ``gather`` would allocate one zero-filled (B, N, V) gradient per gather and add them up; the
    backward here writes softmax-minus-one-hot straight into a single (B, N, V) buffer, which is the gradient of
    the logits that any objective must return. Everything else it keeps is (B, N, K) or (B, V).
    """

    @staticmethod
    def forward(ctx, logits, targets, candidate_ids, candidate_valid, first_token_mle):
        batch, length, _ = logits.shape
        valid = targets != IGNORE_INDEX
        safe_targets = targets.clamp(min=0)
        rows = torch.arange(batch, device=logits.device)
        label_logit = _upcast(logits.gather(2, safe_targets.unsqueeze(2)).squeeze(2))  # (B, N)

        candidate_ids = candidate_ids.expand(batch, length, -1)
        candidate_valid = candidate_valid.expand(batch, length, -1) & valid.unsqueeze(2)
        candidate_logits = _upcast(logits.gather(2, candidate_ids)).masked_fill(~candidate_valid, float("-inf"))
        log_normaliser = candidate_logits.logsumexp(dim=2).masked_fill(~valid, 0.0)  # (B, N)

        first = first_target_positions(targets)
        first_probs = None
        if first_token_mle:
            # The caption's own token set says nothing about how a caption should *start*, so the first position
            # keeps the full-vocabulary softmax (the paper's "first-token MLE"): B rows of V logits, not B x N.
            first_logits = _upcast(logits[rows, first])  # (B, V)
            full_normaliser = first_logits.logsumexp(dim=1)
            log_normaliser[rows, first] = torch.where(valid[rows, first], full_normaliser, 0.0)
            first_probs = (first_logits - full_normaliser.unsqueeze(1)).exp()
            candidate_valid = candidate_valid.clone()
            candidate_valid[rows, first] = False  # their gradient comes from first_probs instead

        count = valid.sum().clamp(min=1)
        candidate_probs = (candidate_logits - log_normaliser.unsqueeze(2)).exp().masked_fill(~candidate_valid, 0.0)
        ctx.save_for_backward(candidate_ids, candidate_probs, safe_targets, valid, first, first_probs, count)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return (log_normaliser - label_logit).masked_fill(~valid, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_output):
        candidate_ids, candidate_probs, safe_targets, valid, first, first_probs, count = ctx.saved_tensors
        grad = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=candidate_ids.device)
        grad.scatter_add_(2, candidate_ids, candidate_probs.to(grad.dtype))
        if first_probs is not None:
            rows = torch.arange(grad.shape[0], device=grad.device)
            grad[rows, first] += first_probs.to(grad.dtype) * valid[rows, first].unsqueeze(1)
        grad.scatter_add_(2, safe_targets.unsqueeze(2), -valid.unsqueeze(2).to(grad.dtype))
        grad.mul_(grad_output / count)
        return grad, None, None, None, None


def _subset_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_valid: torch.Tensor,
    first_token_mle: bool,
) -> torch.Tensor:
    """Cross-entropy where position (b, t) normalises over ``candidate_ids[b, t]`` only.

    Args:
        logits: (B, N, V).
        targets: (B, N), IGNORE_INDEX on ignored positions.
        candidate_ids: (B, N, K) or (B, 1, K) vocabulary ids forming each position's softmax support; it must
            contain the label wherever the label is a valid target, and each id at most once among valid entries.
        candidate_valid: boolean mask of the same shape as candidate_ids; False entries are left out.
        first_token_mle: normalise the first target position of each row over the whole vocabulary instead.
    """
    return _SubsetCrossEntropy.apply(logits, targets, candidate_ids, candidate_valid, first_token_mle)


def smile(logits: torch.Tensor, targets: torch.Tensor, first_token_mle: bool = True) -> torch.Tensor:
    """Semipermeable MLE: softmax restricted to the tokens of the row's own target caption.

    Equivalent to the reference mask-and-fill code (``-inf`` outside the row's token set, pad excluded), but
    gathers the (B, N, N) logits of each row's sorted, de-duplicated token set instead of materialising a
    (B, N, V) mask. No label smoothing: smoothing would push probability onto the excluded vocabulary.
    """
    token_ids, token_valid = row_token_sets(targets)  # (B, N) each
    return _subset_cross_entropy(
        logits, targets, token_ids.unsqueeze(1), token_valid.unsqueeze(1), first_token_mle=first_token_mle
    )


def random_subset(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_samples: int = 10,
    first_token_mle: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ablation "random subsetting": at each position, the label plus ``num_samples`` random vocabulary items.

    The items are drawn uniformly with replacement, independently per position, as
    ``torch.randint(V, (B, N, num_samples))``; a draw that repeats the label or another draw counts once (the
    support is a set, as in the reference's mask). First-token MLE is off by default, as in the paper's code.
    """
    batch, length, vocab = logits.shape
    draws = torch.randint(vocab, (batch, length, num_samples), device=logits.device, generator=generator)
    candidates = torch.cat([targets.clamp(min=0).unsqueeze(2), draws], dim=2)  # (B, N, k+1)
    candidates, _ = candidates.sort(dim=2)
    valid = torch.ones_like(candidates, dtype=torch.bool)
    valid[:, :, 1:] = candidates[:, :, 1:] != candidates[:, :, :-1]
    return _subset_cross_entropy(logits, targets, candidates, valid, first_token_mle=first_token_mle)


def reverse_subset(logits: torch.Tensor, targets: torch.Tensor, first_token_mle: bool = False) -> torch.Tensor:
    """Ablation "reverse subsetting": the vocabulary minus the row's own tokens, plus the label.

    This is SMILE's complement, so it cannot avoid touching all V logits; it costs one (B, N, V) copy, the same
    as the log-softmax inside MLE. First-token MLE is off by default, as in the paper's code.
    """
    batch, length, _ = logits.shape
    valid = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0).unsqueeze(2)  # (B, N, 1)
    token_ids, token_valid = row_token_sets(targets)
    # Invalid set entries point at the label, so removing "them" and then restoring the label is a no-op.
    removed = torch.where(token_valid.unsqueeze(1), token_ids.unsqueeze(1), safe_targets)  # (B, N, N)
    masked = _upcast(logits).scatter(2, removed, float("-inf"))
    masked = masked.scatter(2, safe_targets, _upcast(logits).gather(2, safe_targets))
    log_normaliser = masked.logsumexp(dim=2)
    if first_token_mle:
        first = first_target_positions(targets)
        rows = torch.arange(batch, device=logits.device)
        log_normaliser = log_normaliser.clone()
        log_normaliser[rows, first] = _upcast(logits[rows, first]).logsumexp(dim=1)
    label_logit = _upcast(logits.gather(2, safe_targets).squeeze(2))
    return _masked_mean(log_normaliser - label_logit, valid)


class _SubsetHeadLogits(torch.autograd.Function):
    """The LM head's logits that SMILE reads, with a single (V, D) buffer for the gradient of ``weight``.

    Forward: ``set_logits[b, n, k] = features[b, n] . weight[token_ids[b, k]] + bias[token_ids[b, k]]`` (B, N, K)
    and, given ``first`` (B,), ``first_logits[b] = weight @ features[b, first[b]] + bias`` (B, V) (else an empty
    tensor). The ops run under the caller's autocast, as the plain head would.

    Why a Function: through autograd, the gather of the set rows (``F.embedding``) and the first positions'
    projection each return a dense (V, D) gradient for ``weight``, which autograd then adds: two to three (V, D)
    buffers at the step's peak where MLE's head has one. At VLM vocabularies and widths that is the largest
    tensor of the step (V x D x 4 bytes: 2.2 GB at Qwen2-VL-7B's V = 152,064, D = 3,584), so SMILE would use more
    memory than MLE (1.5x at D = 1,024, ``benchmarks/bench_vlm_vocab.py``). The backward writes the first
    positions' outer product into one (V, D) buffer and index-adds the set rows' gradients into it, in the
    weight's dtype (those products are (V, B) x (B, D) and (B, K, N) x (B, N, D): small, so exact).
    """

    @staticmethod
    def forward(ctx, features, weight, bias, token_ids, first):
        set_logits = torch.bmm(features, F.embedding(token_ids, weight).transpose(1, 2))  # (B, N, K)
        if bias is not None:
            set_logits = set_logits + bias[token_ids].unsqueeze(1).to(set_logits.dtype)
        if first is None:
            first_logits = set_logits.new_empty(0)
        else:
            rows = torch.arange(features.shape[0], device=features.device)
            first_logits = F.linear(features[rows, first], weight, bias)  # (B, V)
        ctx.save_for_backward(features, weight, token_ids, first)
        ctx.has_bias = bias is not None
        return set_logits, first_logits

    @staticmethod
    def backward(ctx, grad_set, grad_first):
        features, weight, token_ids, first = ctx.saved_tensors
        need_features, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = weight.dtype
        grad_set = grad_set.to(dtype)  # (B, N, K)
        inputs = features.to(dtype)  # (B, N, D)
        grad_features = grad_weight = grad_bias = None
        if need_features:
            grad_features = torch.bmm(grad_set, F.embedding(token_ids, weight))  # (B, N, D)
        if first is not None:
            rows = torch.arange(features.shape[0], device=features.device)
            grad_first = grad_first.to(dtype)  # (B, V)
            if need_features:
                grad_features[rows, first] += grad_first @ weight  # one first position per row
            if need_weight:
                grad_weight = grad_first.t() @ inputs[rows, first]  # (V, D): the one buffer
            if need_bias and ctx.has_bias:
                grad_bias = grad_first.sum(dim=0)
        if need_weight:
            grad_weight = weight.new_zeros(weight.shape) if grad_weight is None else grad_weight
            grad_weight.index_add_(0, token_ids.flatten(), torch.bmm(grad_set.transpose(1, 2), inputs).flatten(0, 1))
        if need_bias and ctx.has_bias:
            grad_bias = grad_set.new_zeros(weight.shape[0]) if grad_bias is None else grad_bias
            grad_bias.index_add_(0, token_ids.flatten(), grad_set.sum(dim=1).flatten())
        if grad_features is not None:
            grad_features = grad_features.to(features.dtype)
        return grad_features, grad_weight, grad_bias, None, None


def smile_from_features(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    first_token_mle: bool = True,
) -> torch.Tensor:
    """SMILE computed from the LM head's input, never forming the (B, N, V) logits.

    ``smile(features @ weight.T + bias, targets)`` needs, at each position, only the logits of the row's own token
    set (and, with first-token MLE, the full-vocabulary log-sum-exp at the row's first target position). So this
    gathers each row's K <= N output embeddings and computes (B, N, K) logits, plus (B, V) logits at the first
    positions: about N / (1 + K) times fewer head FLOPs than the (B, N, V) projection (K ~ 12, N ~ 40 on COCO).
    Equal in value and gradient (w.r.t. ``features``, ``weight`` and ``bias``) to ``smile`` on the full logits. The
    (V, D) gradient of ``weight`` is allocated once (``_SubsetHeadLogits``), as MLE's head does, so that SMILE stays
    within MLE's memory at VLM vocabularies and widths.

    Args:
        features: (B, N, D) the head's transformed hidden states; ``features[:, t]`` predicts ``targets[:, t]``.
        weight: (V, D) output embeddings (BLIP ties them to the word embeddings).
        bias: (V,) output bias, or None.
        targets: (B, N), IGNORE_INDEX on ignored positions.
        first_token_mle: the first target position normalises over the whole vocabulary (see ``smile``).
    """
    valid = targets != IGNORE_INDEX
    token_ids, token_valid = row_token_sets(targets)  # (B, K) each, K = N
    first = first_target_positions(targets) if first_token_mle else None
    # (B, N, K) logits of each row's token set, and (B, V) at the first positions; one (V, D) weight gradient.
    set_logits, first_logits = _SubsetHeadLogits.apply(features, weight, bias, token_ids, first)
    set_logits = _upcast(set_logits)
    # The label's slot in its row's set; ignored positions point at slot 0 and are masked out below.
    is_label = (token_ids.unsqueeze(1) == targets.unsqueeze(2)) & token_valid.unsqueeze(1)  # (B, N, K)
    label_logit = set_logits.gather(2, is_label.int().argmax(dim=2, keepdim=True)).squeeze(2)  # (B, N)
    # Ignored positions get finite scores (0) so that log-sum-exp and its backward stay finite there.
    scores = set_logits.masked_fill(~token_valid.unsqueeze(1), float("-inf")).masked_fill(~valid.unsqueeze(2), 0.0)
    log_normaliser = scores.logsumexp(dim=2)  # (B, N)
    if first_token_mle:
        rows = torch.arange(targets.shape[0], device=targets.device)
        full_normaliser = _upcast(first_logits).logsumexp(dim=1)  # (B,)
        is_first = torch.zeros_like(valid)
        is_first[rows, first] = True
        log_normaliser = torch.where(is_first, full_normaliser.unsqueeze(1), log_normaliser)
    return _masked_mean(log_normaliser - label_logit, valid)


OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "mle": mle,
    "smile": smile,
    "random_subset": random_subset,
    "reverse_subset": reverse_subset,
}


# Objectives that can also be computed from the LM head's input features, ``fn(features, weight, bias, targets,
# **options)``, with the same value and gradients as ``OBJECTIVES[name]`` on the full logits (and less work).
FEATURE_OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "smile": smile_from_features,
}


def _objective_options(name: str) -> list[str]:
    parameters = list(inspect.signature(OBJECTIVES[name]).parameters)
    return [p for p in parameters[2:] if p != "generator"]


class CaptionObjective:
    """A weighted sum of registered objectives, built from the YAML ``objective`` value.

    Accepted forms (parsed by ``utils.parse_weighted_spec``, the parser of every weighted mixture)::

        objective: smile                                   # one objective, weight 1
        objective: {mle: 0.01, smile: 0.99}                # the released "MLE+SMILE 0.01:0.99" model
        objective: {smile: {weight: 0.99, first_token_mle: false}, mle: {weight: 0.01, label_smoothing: 0}}

    Calling it returns ``(total_loss, {name: unweighted_loss})`` so the loop can log each part.
    """

    def __init__(self, spec: str | Mapping):
        options = {name: _objective_options(name) for name in OBJECTIVES}
        self.components: list[tuple[str, float, dict]] = parse_weighted_spec(spec, "objective", options,
                                                                            non_negative=True)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: OBJECTIVES[name](logits, targets, **options) for name, _, options in self.components}
        total = sum(weight * parts[name] for name, weight, _ in self.components)
        return total, parts

    @property
    def supports_features(self) -> bool:
        """Whether every part can be computed from the head's features (``from_features``) instead of logits.

        MLE (and the ablations) normalise over the whole vocabulary at every position, so a mixture that
        contains one needs the full logits anyway.
        """
        return all(name in FEATURE_OBJECTIVES for name, _, _ in self.components)

    def from_features(
        self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """As ``__call__`` on ``logits = features @ weight.T + bias`` (B, N, V), without forming those logits.

        Args:
            features: (B, N, D); weight: (V, D); bias: (V,) or None; targets: (B, N).
        """
        if not self.supports_features:
            unsupported = sorted({name for name, _, _ in self.components} - set(FEATURE_OBJECTIVES))
            raise ValueError(f"{self}: {unsupported} need(s) full logits; call the objective on logits instead")
        parts = {
            name: FEATURE_OBJECTIVES[name](features, weight, bias, targets, **options)
            for name, _, options in self.components
        }
        total = sum(share * parts[name] for name, share, _ in self.components)
        return total, parts

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={weight:g}{options or ''}" for name, weight, options in self.components)
        return f"CaptionObjective({body})"


# ----------------------------------------------------------------------------------------------------------------
# Sequence-level (self-critical) policy gradient
# ----------------------------------------------------------------------------------------------------------------

PG_NORMALIZATIONS = ("tokens", "none", "length")


def sequence_token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position (N, T) (0 where ignored) and the validity mask (N, T).

    ``logits`` (N, T, V) aligned with ``targets`` (N, T), as for the token-level objectives; fp32 reduction.
    """
    valid = targets != IGNORE_INDEX
    log_probs = _upcast(logits).log_softmax(dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~valid, 0.0), valid


def policy_gradient_loss(token_log_probs: torch.Tensor, valid: torch.Tensor, advantages: torch.Tensor,
                         normalize: str = "tokens") -> torch.Tensor:
    """REINFORCE with a baseline: ``-A_n log p(sample_n)``, reduced over the N sampled sequences.

    Args:
        token_log_probs: (N, T) log-probabilities of each sample's tokens (0 where ``valid`` is False).
        valid: (N, T) the sample's positions (its end token included).
        advantages: (N,) reward minus baseline; treated as a constant (no gradient flows into the rewards).
        normalize: "tokens" (the reference, ruotianluo's ``RewardCriterion`` used by CLIP-Caption-Reward:
            ``sum_n sum_t -A_n log p_nt / sum_n T_n``, the mean over every sampled token of the batch),
            "none" (``mean_n -A_n sum_t log p_nt``: the plain sequence log-likelihood) or "length" (each
            sequence's sum divided by its own length, then the mean over sequences).
    """
    if normalize not in PG_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(PG_NORMALIZATIONS)}, got {normalize!r}")
    advantages = advantages.detach().to(token_log_probs.dtype)
    per_sequence = token_log_probs.sum(dim=1)  # (N,)
    lengths = valid.sum(dim=1).to(token_log_probs.dtype)
    if normalize == "tokens":
        return -(advantages * per_sequence).sum() / lengths.sum().clamp(min=1)
    if normalize == "length":
        per_sequence = per_sequence / lengths.clamp(min=1)
    return -(advantages * per_sequence).mean()


class PolicyGradientObjective:
    """SCST's loss for one step, in the ``objective(logits, targets) -> (loss, parts)`` form of the forward pass.

    The first ``num_samples`` rows of the batch are sampled captions with their ``advantages``; the rows after
    them (if any) are reference captions scored by ``token_objective`` (e.g. SMILE), so that a mixture such as
    ``{scst: ..., smile: 0.1}`` needs one forward (and one DDP reduction). ``scales`` multiply each part before
    weighting (the step's distributed token shares); the parts are returned unscaled, for logging.
    """

    supports_features = False

    def __init__(self, advantages: torch.Tensor, num_samples: int, weight: float = 1.0, normalize: str = "tokens",
                 token_objective: CaptionObjective | None = None, scales: tuple = (1.0, 1.0)):
        self.advantages, self.num_samples, self.weight = advantages, num_samples, weight
        self.normalize, self.token_objective, self.scales = normalize, token_objective, scales

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.num_samples
        token_log_probs, valid = sequence_token_log_probs(logits[:n], targets[:n])
        pg = policy_gradient_loss(token_log_probs, valid, self.advantages, self.normalize)
        total, parts = self.weight * self.scales[0] * pg, {"scst": pg}
        if self.token_objective is not None:
            token_total, token_parts = self.token_objective(logits[n:], targets[n:])
            total = total + self.scales[1] * token_total
            parts.update(token_parts)
        return total, parts


# ----------------------------------------------------------------------------------------------------------------
# Applying an objective to a captioner: the one place, for every model family and every kind of step
# ----------------------------------------------------------------------------------------------------------------


class HeadFeatures(NamedTuple):
    """What a captioner's LM head would turn into logits: ``logits = features @ weight.T + bias``.

    ``features`` (B, N, D) are aligned with the targets (B, N) as the logits would be; ``weight`` (V, D) is the
    output embedding (tied to the word embeddings in both families) and ``bias`` (V,) or None. Returned by a
    captioner's ``forward(..., head_features=True)`` so that an objective computable from them (pure SMILE,
    ``CaptionObjective.supports_features``) never forms the (B, N, V) logits.
    """

    features: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


def caption_loss(model, objective, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, targets: torch.Tensor,
                 image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``objective``'s loss for one teacher-forced batch: ``(total, {name: unweighted part})``.

    The one place where an objective meets a model, in the spirit of self-critical.pytorch's ``LossWrapper``:
    families only return what the loss needs, and the training steps only call this.

    Args:
        model: a captioner of any family, or the DDP module wrapping one: only ``model(...)`` is called, so DDP's
            forward hooks run. The head's weight comes out of that forward, and its gradient reaches DDP's
            reducer like any other parameter's.
        objective: a ``CaptionObjective`` or ``PolicyGradientObjective``: ``objective(logits, targets)``, and
            when ``objective.supports_features``, ``objective.from_features(features, weight, bias, targets)``,
            the same value and gradients without the (B, N, V) logits.
        pixel_values: (I, 3, S, S) images, or the family's cached image features (``encode_cache_batch``).
        input_ids, attention_mask: (B, L) from ``tokenize`` (or ``sample_ids`` and ``sequence_mask``).
        targets: (B, N) from ``build_targets(input_ids, attention_mask)``: N = L - 1 for BLIP (the bos predicts
            nothing), L for the prefix LM (the prefix predicts the first token).
        image_index: (B,) the row of each caption's image in ``pixel_values``; default one caption per image.
    """
    if objective.supports_features:
        head = model(pixel_values, input_ids, attention_mask, image_index=image_index, head_features=True)
        return objective.from_features(head.features, head.weight, head.bias, targets)
    logits = model(pixel_values, input_ids, attention_mask, image_index=image_index)
    return objective(logits, targets)
