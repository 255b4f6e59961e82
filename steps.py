"""Training steps: what one batch contributes to the loss. The epoch loop, logging, checkpoints and resume are
shared (engine.train_one_epoch); a kind of step is one small class with one signature::

    step(model, captioner, images, captions, image_ids) -> (loss, parts, stats)

* ``loss``: scalar, already scaled so that DDP's gradient average is the mean over the *global* batch;
* ``parts``: the objective's unweighted terms (logged as ``loss_<name>``);
* ``stats``: other numbers worth logging (rewards, advantage, sample length), scalar tensors.

``TeacherForcedStep`` is every token-level objective (MLE, SMILE, the ablations and their mixtures).
``ScstStep`` is self-critical sequence training (Rennie et al. 2017): sample k captions per image, score them
with a reward mixture (metrics/rewards.py), subtract the baseline (the greedy caption's reward, or the mean of
the image's other samples), and apply the policy gradient, optionally mixed with a token-level objective on the
reference captions in the same forward pass. The YAML form::

    objective: {scst: {reward: {clip_s: 2.0, cider_d: 1.0}, samples: 5, baseline: greedy}}
    objective: {scst: {weight: 1.0, reward: {clip_s: 1.0}}, smile: 0.1}        # SCST + SMILE, one line
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

import utils
from metrics._common import hf_features
from models import IGNORE_INDEX, CaptionObjective
from models.objectives import PG_NORMALIZATIONS, PolicyGradientObjective

logger = logging.getLogger("smile_blip")

SCST = "scst"
BASELINES = ("greedy", "mean_of_others")
# The reference's settings (j-min/CLIP-Caption-Reward): 5 samples, at most 20 words, greedy baseline.
SCST_DEFAULTS = {"weight": 1.0, "reward": "cider_d", "samples": 5, "baseline": "greedy", "max_tokens": 20,
                 "normalize": "tokens", "grammar_model": None}
CLIP_REWARDS = ("clip_s", "ref_clip_s")


def token_share(targets: torch.Tensor) -> torch.Tensor:
    """world_size x (this rank's scored tokens / all ranks' scored tokens); 1 in a single process.

    Objectives average over this rank's tokens, and DDP averages gradients over ranks; scaling by this share
    makes the result the mean over *all* tokens of the global batch, so N processes with batch B/N train exactly
    like one process with batch B (ranks with shorter captions would otherwise count for more).
    """
    if not utils.is_distributed():
        return torch.ones((), device=targets.device)
    local = (targets != IGNORE_INDEX).sum().float()
    total = local.clone()
    torch.distributed.all_reduce(total)
    return local * utils.get_world_size() / total.clamp(min=1)


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
    weight = scst["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"objective.scst.weight must be a non-negative number, got {weight!r}")
    rest = {name: value for name, value in spec.items() if name != SCST}
    return scst, (rest or None)


def reward_names(spec) -> list[str] | None:
    """The reward names of ``objective``'s SCST part (``[]`` without one); None when ``reward`` is malformed."""
    scst, _ = split_objective(spec)
    if scst is None:
        return []
    reward = scst["reward"]
    return [reward] if isinstance(reward, str) else list(reward) if isinstance(reward, Mapping) else None


def check_objective(spec) -> None:
    """Validate ``objective`` (SCST options, reward names, token-level parts) without loading any model."""
    scst, token_spec = split_objective(spec)
    if token_spec is not None:
        CaptionObjective(token_spec)
    if scst is not None:
        from metrics.rewards import REWARDS

        names = reward_names(spec)
        if not names or any(name not in REWARDS for name in names):
            raise ValueError(f"objective.scst.reward must be a reward name or a mapping name -> weight, got "
                             f"{scst['reward']!r}; valid names: {sorted(REWARDS)}")


class TeacherForcedStep:
    """A token-level objective on the batch's reference captions (one teacher-forced forward)."""

    def __init__(self, objective: CaptionObjective):
        self.objective = objective

    def __call__(self, model, captioner, images, captions, image_ids):
        input_ids, attention_mask = captioner.tokenize(captions)
        targets = captioner.build_targets(input_ids, attention_mask)
        # The loss is computed inside the (DDP-wrapped) forward so that pure SMILE can use its token-set head
        # instead of full-vocabulary logits.
        loss, parts = model(images, input_ids, attention_mask, targets=targets, objective=self.objective)
        return loss * token_share(targets), parts, {}

    def __repr__(self) -> str:
        return repr(self.objective)


class ScstStep:
    """Self-critical sequence training, with an optional token-level objective on the references.

    Per batch of B images: k samples per image (multinomial, temperature 1) and, for ``baseline: greedy``, one
    greedy caption, all under ``torch.no_grad`` and in eval mode (no dropout in the policy that samples); the
    rewards of all B*k + B captions in one call (each image encoded by CLIP once); advantages = sample reward -
    baseline; then ONE teacher-forced forward in train mode over [samples ; references] with every caption
    pointing at its image (``image_index``: the image tower runs once per image) computes the log-probabilities
    with gradients. Statistics are averaged over ranks when logged.
    """

    def __init__(self, scst: dict, token_objective: CaptionObjective | None, rewards):
        self.timings: dict[str, float] | None = None  # benchmarks/bench_scst.py sets a dict: seconds per phase
        self.options = scst
        self.token_objective = token_objective
        self.rewards = rewards
        self.clip = rewards.context.clip() if any(name in CLIP_REWARDS for name, _, _ in rewards.components) else None

    def __call__(self, model, captioner, images, captions, image_ids):
        options, batch = self.options, images.shape[0]
        samples = options["samples"]
        was_training = captioner.training
        clock = _PhaseClock(self.timings, images.device)
        captioner.eval()
        with torch.no_grad():
            sampled = captioner.sample_ids(images, num_samples=samples, max_new_tokens=options["max_tokens"])
            clock.lap("sampling")
            greedy = (captioner.sample_ids(images, max_new_tokens=options["max_tokens"], greedy=True)
                      if options["baseline"] == "greedy" else None)
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
        if greedy is not None:
            baseline = total[batch * samples:].unsqueeze(1)  # (B, 1)
            advantages = (sample_rewards - baseline).reshape(-1)
        else:  # Luo's variant, the mean reward of the image's other samples: x - (sum - x)/(k-1) = k/(k-1) (x - mean)
            baseline = sample_rewards.mean(dim=1, keepdim=True)
            advantages = (samples / (samples - 1) * (sample_rewards - baseline)).reshape(-1)
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
        scales = (token_share(targets[:n]) if options["normalize"] == "tokens" else torch.ones((), device=images.device),
                  token_share(targets[n:]) if self.token_objective is not None else 1.0)
        objective = PolicyGradientObjective(advantages, n, weight=options["weight"], normalize=options["normalize"],
                                            token_objective=self.token_objective, scales=scales)
        loss, parts = model(images, input_ids, attention_mask, targets=targets, objective=objective,
                            image_index=torch.cat(rows_image))
        clock.lap("forward")
        stats = {"reward": sample_rewards.float().mean(), "advantage": advantages.mean(),
                 "sample_length": sample_mask.sum(dim=1).float().mean()}
        if greedy is not None:
            stats["greedy_reward"] = baseline.float().mean()
        for name, values in reward_parts.items():
            stats[f"reward_{name}"] = values[: n].to(images.device).mean()
        return loss, parts, stats

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


def _pad_and_stack(ids: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks of different lengths -> one (N, T) batch; padding holds id 0 with mask 0 (never a target)."""
    length = max(block.shape[1] for block in ids)
    padded = [F.pad(block, (0, length - block.shape[1]), value=0) for block in ids]
    padded_masks = [F.pad(block, (0, length - block.shape[1]), value=0) for block in masks]
    return torch.cat(padded), torch.cat(padded_masks)


def build_step(config: dict, captioner, train_dataset, device: torch.device):
    """The training step the config's ``objective`` names (see the module docstring)."""
    scst, token_spec = split_objective(config["objective"])
    token_objective = CaptionObjective(token_spec) if token_spec is not None else None
    if scst is None:
        return TeacherForcedStep(token_objective)
    from metrics.rewards import RewardMixture

    references: dict[int, list[str]] = {}
    for _, caption, image_id in train_dataset.samples:
        references.setdefault(image_id, []).append(caption)
    rewards = RewardMixture(
        scst["reward"], references=references, annotation_files=[str(p) for p in train_dataset.annotation_files],
        cache_dir=Path(config["model"]["cache_dir"]).expanduser() / "cider_d", clip_model=config["eval"]["clip_model"],
        grammar_model=scst["grammar_model"], device=device,
    )
    return ScstStep(scst, token_objective, rewards)
