"""Training steps: what one batch contributes to the loss. The epoch loop, logging, checkpoints and resume are
shared (training.train_one_epoch); a kind of step is one small class with one signature::

    step(model, captioner, images, captions, image_ids) -> (loss, parts, stats)

* ``loss``: scalar, already scaled so that DDP's gradient average is the mean over the *global* batch, computed
  by ``models.objectives.caption_loss`` (the one place an objective meets a model family);
* ``parts``: the objective's unweighted terms (logged as ``loss_<name>``);
* ``stats``: other numbers worth logging (rewards, advantage, sample length), scalar tensors.

A call is two phases, which gradient accumulation (``accumulate_gradients``) runs separately:
``step.prepare(captioner, images, captions, image_ids)`` does the work without gradients (tokenising; for SCST
sampling and rewards) and says how many items each loss term averages over (``Prepared.counts``), and
``step.loss(model, captioner, prepared, shares)`` runs the forward with each term scaled by its share
(``loss_shares``). Splitting a batch into micro-batches therefore gives exactly the loss and gradients of the
whole batch: every term is a mean over the whole batch's tokens (or sequences), not a mean of micro-batch means.

``TeacherForcedStep`` is every token-level objective (MLE, SMILE, the ablations and their mixtures).
``ScstStep`` is self-critical sequence training (Rennie et al. 2017): sample k captions per image, score them
with a reward mixture (metrics/rewards.py), subtract the baseline (the greedy caption's reward, or the mean of
the image's other samples), and apply the policy gradient, optionally mixed with a token-level objective on the
reference captions in the same forward pass. The YAML form::

    objective: {scst: {reward: {clip_s: 2.0, cider_d: 1.0}, samples: 5, baseline: greedy}}
    objective: {scst: {weight: 1.0, reward: {clip_s: 1.0}}, smile: 0.1}        # SCST + SMILE, one line
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import utils
from metrics._common import hf_features
from models import IGNORE_INDEX, CaptionObjective
from models.objectives import PG_NORMALIZATIONS, PolicyGradientObjective, caption_loss

logger = logging.getLogger("smile_blip")

SCST = "scst"
BASELINES = ("greedy", "mean_of_others")
# The reference's settings (j-min/CLIP-Caption-Reward): 5 samples, at most 20 words, greedy baseline.
# policy_dropout: false runs the policy-gradient forward without dropout, i.e. differentiates the policy that drew
# the samples (ScstStep's docstring says why this differs from the reference).
# log_greedy: with baseline mean_of_others, still decode and score the greedy caption, only to log its reward.
SCST_DEFAULTS = {"weight": 1.0, "reward": "cider_d", "samples": 5, "baseline": "greedy", "max_tokens": 20,
                 "normalize": "tokens", "policy_dropout": False, "log_greedy": False, "grammar_model": None,
                 "clip_model": "openai/clip-vit-base-patch32"}
CLIP_REWARDS = ("clip_s", "ref_clip_s")
REWARD_KEY = "objective.scst.reward"


def scored_tokens(targets: torch.Tensor) -> torch.Tensor:
    """The number of positions of ``targets`` (N, T) that carry a loss (float scalar)."""
    return (targets != IGNORE_INDEX).sum().float()


def loss_shares(counts: torch.Tensor) -> torch.Tensor:
    """(M, K) items per loss term and micro-batch -> (M, K) scales for the terms' micro-batch means.

    Each of the K loss terms of a step is a mean over its own items (scored tokens, or sequences); micro-batch m
    computes it over its ``counts[m, k]`` items. Scaling that mean by ``world_size x counts[m, k] / total_k``,
    where ``total_k`` sums the counts over the M micro-batches of this rank and over every rank, makes the sum of
    the scaled micro-batch losses, after DDP's gradient average over ranks, the mean over *all* items of the
    global batch. So N processes with batch B/N, or one process accumulating B in micro-batches, train exactly
    like one process with batch B (ranks or micro-batches with shorter captions would otherwise count for more).
    One all-reduce per step, of K numbers; in one process without accumulation every share is 1.
    """
    totals = counts.sum(dim=0)
    if utils.is_distributed():
        torch.distributed.all_reduce(totals)
    return counts * utils.get_world_size() / totals.clamp(min=1)


@dataclasses.dataclass
class Prepared:
    """What ``step.prepare`` computed for one (micro-)batch: its inputs, the gradient-free work (``work``: the
    step's own fields) and ``counts`` (K,), the number of items each of the step's loss terms averages over."""

    images: torch.Tensor
    image_ids: torch.Tensor
    counts: torch.Tensor
    work: dict


def split_objective(spec) -> tuple[dict | None, str | dict | None]:
    """``objective`` -> (the SCST options or None, the token-level objective spec or None)."""
    if isinstance(spec, str):
        return (dict(SCST_DEFAULTS), None) if spec == SCST else (None, spec)
    if not isinstance(spec, Mapping):
        return None, spec  # CaptionObjective names the problem
    if SCST not in spec:
        return None, dict(spec)
    options = spec[SCST]
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"objective.scst must be a mapping of SCST options, got {options!r}; "
                         f"valid options: {sorted(SCST_DEFAULTS)}")
    unknown = sorted(set(options) - set(SCST_DEFAULTS))
    if unknown:
        raise ValueError(f"objective.scst: unknown option(s) {unknown}; valid options: {sorted(SCST_DEFAULTS)}")
    scst = {**SCST_DEFAULTS, **options}
    if scst["baseline"] not in BASELINES:
        raise ValueError(f"objective.scst.baseline must be one of {list(BASELINES)}, got {scst['baseline']!r}")
    if scst["normalize"] not in PG_NORMALIZATIONS:
        raise ValueError(f"objective.scst.normalize must be one of {list(PG_NORMALIZATIONS)}, "
                         f"got {scst['normalize']!r}")
    minimum = 2 if scst["baseline"] == "mean_of_others" else 1
    for key, low in (("samples", minimum), ("max_tokens", 1)):
        value = scst[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"objective.scst.{key} must be an integer >= {low}, got {value!r}")
    for key in ("policy_dropout", "log_greedy"):
        if not isinstance(scst[key], bool):
            raise ValueError(f"objective.scst.{key} must be true or false, got {scst[key]!r}")
    weight = scst["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"objective.scst.weight must be a non-negative number, got {weight!r}")
    rest = {name: value for name, value in spec.items() if name != SCST}
    return scst, (rest or None)


def reward_clip_model(spec) -> str | None:
    """The CLIP the objective's SCST rewards load (``objective.scst.clip_model``), or None when no reward needs one.
    ``spec`` is valid (``check_objective``)."""
    if not any(name in CLIP_REWARDS for name in reward_names(spec)):
        return None
    return split_objective(spec)[0]["clip_model"]


def reward_names(spec) -> list[str]:
    """The reward names of ``objective``'s SCST part (``[]`` without one). ``spec`` is valid (``check_objective``)."""
    scst, _ = split_objective(spec)
    if scst is None:
        return []
    from metrics.rewards import parse_reward_spec

    return [name for name, _, _ in parse_reward_spec(scst["reward"], key=REWARD_KEY)]


def check_objective(spec) -> None:
    """Validate ``objective`` without loading any model: the SCST options, the reward mixture (names, weights,
    options) and the token-level parts. training.load_config calls it, so that a bad value is a one-line config
    error naming its key before any output folder or model exists."""
    scst, token_spec = split_objective(spec)
    if token_spec is not None:
        CaptionObjective(token_spec)
    if scst is not None:
        reward_names(spec)


def scst_advantages(rewards: torch.Tensor, num_images: int, samples: int,
                    baseline: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SCST's advantages (B*k,) and the baselines (B, 1) they subtract.

    ``rewards``: the B*k samples' rewards, image-major (image 0's k samples first), followed for ``baseline:
    greedy`` by the B greedy captions' rewards. ``greedy``: sample reward - the image's greedy reward (Rennie et al.
    2017). ``mean_of_others``: sample reward - the mean of the image's other k - 1 samples (Luo 2020), computed as
    ``k / (k - 1) * (x - mean)``, since ``x - (sum - x) / (k - 1)`` equals that.
    """
    expected = num_images * samples + (num_images if baseline == "greedy" else 0)
    if rewards.shape != (expected,):
        raise ValueError(f"expected {expected} rewards (B*k samples{', then B greedy' if baseline == 'greedy' else ''}"
                         f"), got shape {tuple(rewards.shape)}")
    sample_rewards = rewards[: num_images * samples].view(num_images, samples)
    if baseline == "greedy":
        baselines = rewards[num_images * samples:].unsqueeze(1)
        return (sample_rewards - baselines).reshape(-1), baselines
    baselines = sample_rewards.mean(dim=1, keepdim=True)
    return (samples / (samples - 1) * (sample_rewards - baselines)).reshape(-1), baselines


class _TwoPhaseStep:
    """``__call__`` for a step that has ``prepare`` and ``loss``: the whole batch as one micro-batch."""

    def __call__(self, model, captioner, images, captions, image_ids):
        prepared = self.prepare(captioner, images, captions, image_ids)
        return self.loss(model, captioner, prepared, loss_shares(prepared.counts.unsqueeze(0))[0])


class TeacherForcedStep(_TwoPhaseStep):
    """A token-level objective on the batch's reference captions (one teacher-forced forward); one loss term,
    the mean over the batch's scored tokens."""

    def __init__(self, objective: CaptionObjective):
        self.objective = objective

    def prepare(self, captioner, images, captions, image_ids) -> Prepared:
        input_ids, attention_mask = captioner.tokenize(captions)
        targets = captioner.build_targets(input_ids, attention_mask)
        return Prepared(images, image_ids, scored_tokens(targets).view(1),
                        {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets})

    def loss(self, model, captioner, prepared: Prepared, shares: torch.Tensor):
        work = prepared.work
        loss, parts = caption_loss(model, self.objective, prepared.images, work["input_ids"],
                                   work["attention_mask"], work["targets"])
        return loss * shares[0], parts, {}

    def __repr__(self) -> str:
        return repr(self.objective)


class ScstStep(_TwoPhaseStep):
    """Self-critical sequence training, with an optional token-level objective on the references.

    Per batch of B images: k samples per image (multinomial, temperature 1, each ending at its first end token,
    which is part of the sample) and, for ``baseline: greedy``, one greedy caption, all under ``torch.no_grad`` and
    in eval mode; the rewards of all B*k + B captions in one call (each image encoded by CLIP once); advantages =
    sample reward - baseline; then ONE teacher-forced forward over [samples ; references] with every caption
    pointing at its image (``image_index``: the image tower runs once per image) computes the log-probabilities
    with gradients, of exactly the sampled tokens: each sample's caption tokens and its end token (the prompt and
    the padding after the end token are masked by ``build_targets``).

    That forward runs in eval mode too (``policy_dropout: false``, the default), so the gradient is that of the
    policy which drew the samples and which greedy decoding (the baseline, and evaluation) uses: REINFORCE's
    ``E[A grad log pi(y)]`` needs ``y ~ pi`` for the same ``pi``. The reference (self-critical.pytorch) samples in
    train mode and differentiates that same pass, which is also consistent; sampling without dropout and then
    differentiating a dropout pass (``policy_dropout: true``, this step's behaviour before) is neither: on the toy
    set that mismatch moves the greedy captions in a direction no reward asked for (docs/objectives.md). With a
    token objective in the mix, its reference rows share the forward and so run without dropout as well.

    Logged statistics (averaged over ranks): ``reward`` and ``greedy_reward`` (mean sample and greedy reward),
    ``advantage``, ``sample_length`` and ``greedy_length`` (words per caption), ``sample_is_greedy`` (the fraction
    of samples identical to their image's greedy caption: near 1, the policy has collapsed onto its greedy
    caption and SCST has little left to learn from).
    """

    def __init__(self, scst: dict, token_objective: CaptionObjective | None, rewards):
        self.timings: dict[str, float] | None = None  # benchmarks/bench_scst.py sets a dict: seconds per phase
        self.options = scst
        self.token_objective = token_objective
        self.rewards = rewards
        self.clip = rewards.context.clip() if any(name in CLIP_REWARDS for name, _, _ in rewards.components) else None

    def prepare(self, captioner, images, captions, image_ids) -> Prepared:
        """Sampling, rewards and advantages (no gradients); two loss terms: the policy gradient, a mean over the
        sampled tokens (``normalize: tokens``) or sequences, and the token objective's mean over reference tokens."""
        options, batch = self.options, images.shape[0]
        samples = options["samples"]
        was_training = captioner.training
        clock = _PhaseClock(self.timings, images.device)
        captioner.eval()
        with torch.no_grad():
            sampled = captioner.sample_ids(images, num_samples=samples, max_new_tokens=options["max_tokens"])
            clock.lap("sampling")
            greedy = (captioner.sample_ids(images, max_new_tokens=options["max_tokens"], greedy=True)
                      if options["baseline"] == "greedy" or options["log_greedy"] else None)
            clock.lap("greedy")
        captioner.train(was_training)
        texts = captioner.decode(sampled)
        scored = texts + (captioner.decode(greedy) if greedy is not None else [])
        sample_image = torch.arange(batch, device=images.device).repeat_interleave(samples)
        reward_index = torch.cat([sample_image, torch.arange(batch, device=images.device)]) \
            if greedy is not None else sample_image
        with torch.no_grad():
            features = self._clip_features(images).cpu() if self.clip is not None else None
        total, reward_parts = self.rewards(scored, reward_index.cpu(), images=features, keys=image_ids.tolist())
        total = total.to(images.device, torch.float64)  # float64: equal rewards give exactly zero advantage
        sample_rewards = total[: batch * samples].view(batch, samples)
        advantages, _ = scst_advantages(total if options["baseline"] == "greedy" else total[: batch * samples],
                                        batch, samples, options["baseline"])
        advantages = advantages.float()
        clock.lap("rewards")

        sample_mask = captioner.sequence_mask(sampled)
        rows_ids, rows_mask, rows_image = [sampled], [sample_mask], [sample_image]
        if self.token_objective is not None:
            reference_ids, reference_mask = captioner.tokenize(captions)
            rows_ids.append(reference_ids)
            rows_mask.append(reference_mask)
            rows_image.append(torch.arange(batch, device=images.device))
        input_ids, attention_mask = _pad_and_stack(rows_ids, rows_mask)
        targets = captioner.build_targets(input_ids, attention_mask)
        n = batch * samples
        pg_items = scored_tokens(targets[:n]) if options["normalize"] == "tokens" else torch.tensor(
            float(n), device=images.device)  # "none" and "length" average over the sampled sequences
        counts = torch.stack([pg_items, scored_tokens(targets[n:])])
        stats = {"reward": sample_rewards.float().mean(), "advantage": advantages.mean(),
                 "sample_length": _mean_words(texts, images.device)}
        if greedy is not None:
            greedy_texts = scored[n:]
            stats["greedy_reward"] = total[n:].float().mean()
            stats["greedy_length"] = _mean_words(greedy_texts, images.device)
            same = [text == greedy_texts[index // samples] for index, text in enumerate(texts)]
            stats["sample_is_greedy"] = torch.tensor(same, dtype=torch.float32, device=images.device).mean()
        for name, values in reward_parts.items():
            stats[f"reward_{name}"] = values[: n].to(images.device).mean()
        work = {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
                "image_index": torch.cat(rows_image), "advantages": advantages, "stats": stats, "clock": clock}
        return Prepared(images, image_ids, counts, work)

    def loss(self, model, captioner, prepared: Prepared, shares: torch.Tensor):
        work, n = prepared.work, prepared.images.shape[0] * self.options["samples"]
        objective = PolicyGradientObjective(work["advantages"], n, weight=self.options["weight"],
                                            normalize=self.options["normalize"], token_objective=self.token_objective,
                                            scales=(shares[0], shares[1]))
        was_training = model.training
        model.train(was_training and self.options["policy_dropout"])  # the sampling policy's mode (class doc)
        try:
            loss, parts = caption_loss(model, objective, prepared.images, work["input_ids"],
                                       work["attention_mask"], work["targets"], image_index=work["image_index"])
        finally:
            model.train(was_training)
        work["clock"].lap("forward")
        return loss, parts, work["stats"]

    def _clip_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm CLIP image features of the batch the captioner sees, computed on its device.

        Both model families normalise pixels with CLIP's mean and std (imaging.CLIP_MEAN/STD), so the batch only
        needs resizing to CLIP's input size (bicubic; a square resize, as BLIP's evaluation) to be a CLIP input.
        """
        clip = self.clip
        size = clip.model.config.vision_config.image_size
        pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        features = hf_features(clip.model.get_image_features(pixel_values=pixels.to(clip.device, torch.float32)))
        return F.normalize(features.float(), dim=-1)

    def __repr__(self) -> str:
        mixed = f" + {self.token_objective}" if self.token_objective is not None else ""
        return f"ScstStep({self.rewards}, samples={self.options['samples']}, baseline={self.options['baseline']}){mixed}"


def micro_batch_bounds(batch_size: int, micro_batch_size: int | None) -> list[tuple[int, int]]:
    """[(start, stop), ...] splitting ``batch_size`` rows into chunks of at most ``micro_batch_size`` (None: one)."""
    size = micro_batch_size or batch_size
    return [(start, min(start + size, batch_size)) for start in range(0, batch_size, size)]


def accumulate_gradients(model, captioner, step, images, captions, image_ids, micro_batch_size: int | None = None,
                         precision=nullcontext, all_finite=None):
    """Forward and backward of one optimiser step's batch, in micro-batches of at most ``micro_batch_size`` images.

    Adds the batch's gradients to ``.grad`` (the caller zeroes them before and steps the optimiser after). Every
    micro-batch is prepared first (``step.prepare``: tokenising, SCST's sampling, all under ``precision()``, e.g.
    autocast), then the counts give each loss term its share of the *whole* batch (``loss_shares``, one
    all-reduce), so the accumulated gradient equals the one-batch gradient up to float rounding (dropout and
    random draws aside); activations live for one micro-batch at a time. Under DDP the gradient all-reduce runs
    once, in the last micro-batch's backward (``no_sync`` before it).

    ``all_finite(loss) -> bool`` (e.g. a flag all-reduced over ranks) is asked about the summed loss before the
    last backward; when it says no, that backward is skipped and ``finite`` is False: the caller drops the step.

    Returns ``(loss, parts, stats, finite)``: the batch's loss (detached; what one-batch ``step`` returns), and
    ``parts``/``stats`` averaged over micro-batches weighted by their number of images (for logging).
    """
    bounds = micro_batch_bounds(len(captions), micro_batch_size)
    with precision():
        prepared = [step.prepare(captioner, images[start:stop], captions[start:stop], image_ids[start:stop])
                    for start, stop in bounds]
    shares = loss_shares(torch.stack([chunk.counts for chunk in prepared]))
    total = torch.zeros((), device=images.device)
    parts_sum: dict[str, torch.Tensor] = {}
    stats_sum: dict[str, torch.Tensor] = {}
    for index, (chunk, share) in enumerate(zip(prepared, shares)):
        with precision():
            loss, parts, stats = step.loss(model, captioner, chunk, share)
        weight = chunk.images.shape[0] / len(captions)
        for store, values in ((parts_sum, parts), (stats_sum, stats)):
            for name, value in values.items():
                store[name] = store.get(name, 0.0) + weight * value.detach().float()
        total = total + loss.detach().float()
        last = index == len(prepared) - 1
        if last and all_finite is not None and not all_finite(total):
            return total, parts_sum, stats_sum, False
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss.backward()
    return total, parts_sum, stats_sum, True


class _PhaseClock:
    """Seconds per phase into ``store`` (a dict), synchronising CUDA first; does nothing when ``store`` is None."""

    def __init__(self, store: dict | None, device: torch.device):
        self.store, self.device = store, device
        self.start = self._now() if store is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> None:
        if self.store is not None:
            now = self._now()
            self.store[name] = self.store.get(name, 0.0) + now - self.start
            self.start = now


def _mean_words(texts: list[str], device: torch.device) -> torch.Tensor:
    """Mean number of words of ``texts`` (scalar float tensor on ``device``)."""
    return torch.tensor([len(text.split()) for text in texts], dtype=torch.float32, device=device).mean()


def _pad_and_stack(ids: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks of different lengths -> one (N, T) batch; padding holds id 0 with mask 0 (never a target)."""
    length = max(block.shape[1] for block in ids)
    padded = [F.pad(block, (0, length - block.shape[1]), value=0) for block in ids]
    padded_masks = [F.pad(block, (0, length - block.shape[1]), value=0) for block in masks]
    return torch.cat(padded), torch.cat(padded_masks)


def build_step(config: dict, captioner, source, device: torch.device):
    """The training step the config's ``objective`` names (see the module docstring); SCST's references come from
    the training ``source`` (data/sources.py ``CaptionSource``)."""
    scst, token_spec = split_objective(config["objective"])
    token_objective = CaptionObjective(token_spec) if token_spec is not None else None
    if scst is None:
        return TeacherForcedStep(token_objective)
    from metrics.rewards import RewardMixture

    rewards = RewardMixture(
        scst["reward"], references=source.references(), annotation_files=[str(p) for p in source.reference_files()],
        cache_dir=Path(config["model"]["cache_dir"]).expanduser() / "cider_d", clip_model=scst["clip_model"],
        grammar_model=scst["grammar_model"], device=device,
    )
    return ScstStep(scst, token_objective, rewards)
