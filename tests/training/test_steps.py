"""Training steps (steps.py): the SCST policy gradient against the naive definition, the baselines, rollouts of
both model families, and the objective spec."""
import copy

import pytest
import torch

from training import steps
from models import IGNORE_INDEX, CaptionObjective
from models.objectives import PolicyGradientObjective, caption_loss, policy_gradient_loss, sequence_token_log_probs
from tests.conftest import FIXTURES


def _images(batch, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# The loss itself ------------------------------------------------------------------------------------------------


def test_policy_gradient_loss_matches_its_three_definitions():
    torch.manual_seed(0)
    logp = -torch.rand(4, 6)
    valid = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]).bool()
    logp = logp.masked_fill(~valid, 0)
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.0])
    sums, lengths = logp.sum(1), valid.sum(1).float()
    naive_tokens = sum(-advantages[n] * logp[n, t] for n in range(4) for t in range(6) if valid[n, t]) / lengths.sum()
    torch.testing.assert_close(policy_gradient_loss(logp, valid, advantages, "tokens"), naive_tokens)
    torch.testing.assert_close(policy_gradient_loss(logp, valid, advantages, "none"), (-advantages * sums).mean())
    torch.testing.assert_close(policy_gradient_loss(logp, valid, advantages, "length"),
                               (-advantages * sums / lengths).mean())
    with pytest.raises(ValueError, match="normalize must be one of"):
        policy_gradient_loss(logp, valid, advantages, "mean")


def test_sequence_token_log_probs_picks_the_targets_and_ignores_the_rest():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 4, IGNORE_INDEX], [IGNORE_INDEX, 6, 0]])
    picked, valid = sequence_token_log_probs(logits, targets)
    expected = logits.log_softmax(-1)
    assert valid.tolist() == [[True, True, False], [False, True, True]]
    assert picked[0, 0] == expected[0, 0, 1] and picked[1, 2] == expected[1, 2, 0] and picked[0, 2] == 0


# SCST's gradient on a tiny BLIP ---------------------------------------------------------------------------------


def _rollout(captioner, images, samples):
    torch.manual_seed(3)
    ids = captioner.sample_ids(images, num_samples=samples, max_new_tokens=8)
    return ids, captioner.sequence_mask(ids)


def test_scst_gradient_equals_the_naive_reinforce_gradient(fixture_captioner):
    captioner = fixture_captioner.train()
    for module in captioner.modules():  # dropout off: the naive and the batched forward must see one function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images = _images(2)
    samples = 3
    ids, mask = _rollout(captioner, images, samples)
    assert ids.shape[0] == 6
    targets = captioner.build_targets(ids, mask)
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0, 0.0, -1.5])
    image_index = torch.arange(2).repeat_interleave(samples)

    loss, parts = caption_loss(captioner, PolicyGradientObjective(advantages, 6), images, ids, mask, targets,
                               image_index=image_index)
    loss.backward()
    batched = {name: p.grad.clone() for name, p in captioner.named_parameters() if p.grad is not None}

    naive_model = copy.deepcopy(captioner)
    naive_model.zero_grad(set_to_none=True)
    total_tokens = (targets != IGNORE_INDEX).sum()
    naive = 0.0
    for n in range(6):  # one sample at a time, its own image, the textbook -A * sum_t log p / (all tokens)
        logits = naive_model(images[image_index[n]][None], ids[n : n + 1], mask[n : n + 1])
        log_probs = logits.log_softmax(-1)[0]
        for t, target in enumerate(targets[n].tolist()):
            if target != IGNORE_INDEX:
                naive = naive - advantages[n] * log_probs[t, target]
    (naive / total_tokens).backward()
    torch.testing.assert_close(loss, (naive / total_tokens).detach(), rtol=1e-5, atol=1e-6)
    for name, param in naive_model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(batched[name], param.grad, rtol=1e-4, atol=1e-6)
    assert parts["scst"] == loss


class _ConstantReward:
    """A stand-in RewardMixture: every caption gets the same reward."""

    components = [("cider_d", 1.0, None)]
    context = None

    def __call__(self, captions, image_index, images=None, keys=None):
        value = torch.full((len(captions),), 0.7)
        return value, {"cider_d": value}


@pytest.mark.parametrize("baseline", ["greedy", "mean_of_others"])
def test_constant_reward_gives_zero_advantage_and_zero_gradient(fixture_captioner, baseline):
    captioner = fixture_captioner.train()
    scst, _ = steps.split_objective({"scst": {"samples": 3, "baseline": baseline, "max_tokens": 6}})
    step = steps.ScstStep(scst, None, _ConstantReward())
    loss, parts, stats = step(captioner, captioner, _images(2), ["a dog", "a cat"], torch.tensor([1, 2]))
    assert stats["advantage"] == 0 and loss == 0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in captioner.parameters())
    assert captioner.training  # sampling ran in eval mode and the step put training mode back


def test_scst_mixed_with_smile_adds_the_reference_rows_in_the_same_forward(fixture_captioner):
    captioner = fixture_captioner.train()
    for module in captioner.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    scst, token_spec = steps.split_objective({"scst": {"samples": 2, "max_tokens": 6}, "smile": 0.1})
    assert token_spec == {"smile": 0.1}
    smile = CaptionObjective(token_spec)
    step = steps.ScstStep(scst, smile, _ConstantReward())
    images, captions = _images(2), ["a small white cat on a table", "a dog"]
    loss, parts, _ = step(captioner, captioner, images, captions, torch.tensor([1, 2]))
    input_ids, attention_mask = captioner.tokenize(captions)
    reference, _ = caption_loss(captioner, smile, images, input_ids, attention_mask,
                                captioner.build_targets(input_ids, attention_mask))
    # Constant reward: the SCST term is 0, so the loss is exactly the SMILE term on the references.
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"scst", "smile"}


class _WordReward(_ConstantReward):
    """A deterministic reward that prefers one word and short captions: ``[word in caption] - 0.1 x words``. Its
    best caption is the word alone, so learning it needs the word's log-probability raised at the position where it
    was sampled and the end token's right after it: a flipped advantage, a shifted target or a mask without the end
    token all miss it."""

    def __init__(self, word: str):
        self.word = word

    def __call__(self, captions, image_index, images=None, keys=None):
        value = torch.tensor([float(self.word in c.split()) - 0.1 * len(c.split()) for c in captions])
        return value, {"cider_d": value}


def _greedy_captions(captioner, images):
    was_training = captioner.training
    captioner.eval()
    with torch.no_grad():
        captions = captioner.decode(captioner.sample_ids(images, greedy=True, max_new_tokens=8))
    captioner.train(was_training)
    return captions


def test_scst_raises_the_greedy_frequency_and_reward_of_the_word_its_reward_prefers(fixture_captioner):
    """SCST must raise what it optimises: 20 steps on 6 images take the greedy captions from 'blue' in 1-3 of 6
    (reward about -0.5) to 'blue' in all of them, ended right after it (reward >= 0.6). Checked to fail when broken
    in training/steps.py: advantages negated (greedy 'a a a a a a a a'), targets shifted by one (empty captions),
    the end token left out of the mask ('blue blue ... blue', reward 0.2). The scored tokens must be each sample's
    caption tokens and its end token, nothing after it: a mask that also scored the padding would not change the
    greedy captions, so the count checks it (and fails for the end-token-less mask too)."""
    torch.manual_seed(0)
    captioner = fixture_captioner.train()
    images, word, samples = _images(6), "blue", 4
    reward = _WordReward(word)
    scst, _ = steps.split_objective({"scst": {"samples": samples, "max_tokens": 8}})
    step = steps.ScstStep(scst, None, reward)
    start = _greedy_captions(captioner, images)
    start_reward = float(reward(start, None)[0].mean())
    assert sum(word in c.split() for c in start) <= 3 and start_reward < -0.3

    prompt, sep = captioner.prompt_length, captioner.tokenizer.sep_token_id
    prepared = step.prepare(captioner, images, ["x"] * 6, torch.arange(6))
    caption_ids = prepared.work["input_ids"][:, prompt:]
    ended = caption_ids == sep
    lengths = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, torch.full_like(ended[:, 0], 8, dtype=torch.long))
    assert prepared.counts[0] == lengths.sum()  # caption tokens + end token per sample, nothing after it

    optimizer = torch.optim.Adam(captioner.parameters(), lr=2e-3)
    for _ in range(20):
        optimizer.zero_grad(set_to_none=True)
        loss, _, stats = step(captioner, captioner, images, ["x"] * 6, torch.arange(6))
        loss.backward()
        optimizer.step()
    final = _greedy_captions(captioner, images)
    final_reward = float(reward(final, None)[0].mean())
    assert all(word in c.split() for c in final), final
    assert final_reward >= 0.6, (final_reward, final)
    assert float(stats["greedy_reward"]) > start_reward and {"sample_length", "greedy_length",
                                                              "sample_is_greedy"} <= set(stats)


def test_the_policy_gradient_forward_runs_without_dropout_unless_asked(fixture_captioner):
    """policy_dropout: false (default) differentiates the policy that sampled (eval mode: two calls on the same
    prepared batch give one loss), and leaves the model in train mode; true keeps the training mode's dropout."""
    captioner = fixture_captioner.train()
    images = _images(2)
    for policy_dropout, same in ((False, True), (True, False)):
        scst, _ = steps.split_objective({"scst": {"samples": 3, "max_tokens": 6, "policy_dropout": policy_dropout}})
        step = steps.ScstStep(scst, None, _RowReward())
        torch.manual_seed(0)
        prepared = step.prepare(captioner, images, ["a", "b"], torch.tensor([1, 2]))
        first, _, _ = step.loss(captioner, captioner, prepared, torch.ones(2))
        second, _, _ = step.loss(captioner, captioner, prepared, torch.ones(2))
        assert torch.equal(first, second) == same and captioner.training
    with pytest.raises(ValueError, match="policy_dropout must be true or false"):
        steps.check_objective({"scst": {"policy_dropout": "no"}})


def test_log_greedy_scores_the_greedy_caption_without_changing_the_mean_of_others_advantages(fixture_captioner):
    captioner = fixture_captioner.train()
    images, captions, ids = _images(2), ["a", "b"], torch.tensor([1, 2])
    prepared = {}
    for log_greedy in (False, True):
        scst, _ = steps.split_objective({"scst": {"samples": 3, "max_tokens": 8, "baseline": "mean_of_others",
                                                  "log_greedy": log_greedy}})
        torch.manual_seed(0)
        prepared[log_greedy] = steps.ScstStep(scst, None, _WordReward("a")).prepare(captioner, images, captions, ids)
    plain, logged = prepared[False].work, prepared[True].work
    assert torch.equal(plain["advantages"], logged["advantages"])  # the same samples, the same baseline
    assert "greedy_reward" not in plain["stats"]
    expected = _WordReward("a")(_greedy_captions(captioner, images), None)[0].mean()
    assert float(logged["stats"]["greedy_reward"]) == pytest.approx(float(expected))


def test_blip_rollouts_are_in_tokenize_layout(fixture_captioner):
    captioner = fixture_captioner.eval()
    images = _images(2)
    ids, mask = _rollout(captioner, images, 4)
    assert ids.shape[0] == 8
    sep = captioner.tokenizer.sep_token_id
    prompt = captioner.prompt_length
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        caption = row[prompt:]
        end = caption.index(sep) + prompt if sep in caption else len(row) - 1
        assert row_mask == [1] * (end + 1) + [0] * (len(row) - end - 1)
        assert all(token == captioner.tokenizer.pad_token_id for token in row[end + 1:])
    greedy = captioner.sample_ids(images, greedy=True, max_new_tokens=8)
    again = captioner.sample_ids(images, greedy=True, max_new_tokens=8)
    assert torch.equal(greedy, again) and greedy.shape[0] == 2
    targets = captioner.build_targets(ids, mask)
    assert (targets[:, : prompt - 1] == IGNORE_INDEX).all()


def test_scst_advantages_subtract_the_greedy_reward_or_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 1.0], dtype=torch.float64)  # B=2, k=2: samples, then greedy
    advantages, baselines = steps.scst_advantages(rewards, 2, 2, "greedy")
    torch.testing.assert_close(advantages, torch.tensor([0.5, 1.5, 2.0, 3.0], dtype=torch.float64))
    assert baselines.tolist() == [[0.5], [1.0]]
    samples = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0], dtype=torch.float64)  # B=2, k=3, no greedy
    advantages, _ = steps.scst_advantages(samples, 2, 3, "mean_of_others")
    naive = [samples[i] - (samples[3 * (i // 3): 3 * (i // 3) + 3].sum() - samples[i]) / 2 for i in range(6)]
    torch.testing.assert_close(advantages, torch.stack(naive))
    with pytest.raises(ValueError, match="expected 6 rewards"):
        steps.scst_advantages(rewards[:4], 2, 2, "greedy")


def test_a_non_numeric_reward_weight_fails_at_config_load_naming_key_and_value(tmp_path, capsys):
    import train_caption
    import training
    import utils

    config = tmp_path / "scst.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nobjective: {{scst: {{reward: {{cider_d: heavy}}}}}}\n")
    message = "objective.scst.reward.cider_d: weight must be a number, got 'heavy'"
    with pytest.raises(utils.ConfigError, match=message.replace(".", r"\.")):
        training.load_config(config)
    with pytest.raises(utils.ConfigError, match=r"objective\.scst\.reward: unknown reward 'bleu'"):
        training.load_config(config, ["objective={scst: {reward: {bleu: 1.0}}}"])
    # The entry point: one line on stderr, status 2, before any output folder exists.
    assert utils.run_cli(train_caption.main, training.USER_ERRORS, ["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_objective_spec_is_checked_before_anything_is_built():
    assert steps.split_objective("smile") == (None, "smile")
    scst, rest = steps.split_objective({"scst": {"reward": {"clip_s": 2.0, "cider_d": 1.0}}})
    assert rest is None and scst["samples"] == 5 and scst["baseline"] == "greedy" and scst["normalize"] == "tokens"
    steps.check_objective({"scst": {"reward": {"clip_s": 2.0, "cider_d": 1.0}}, "mle": 0.5})
    for bad, message in (({"scst": {"samples": 0}}, "samples must be an integer >= 1"),
                         ({"scst": {"baseline": "mean"}}, "baseline must be one of"),
                         ({"scst": {"baseline": "mean_of_others", "samples": 1}}, "samples must be an integer >= 2"),
                         ({"scst": {"rewards": "cider_d"}}, "unknown option"),
                         ({"scst": {"reward": "bleu"}}, "valid names"),
                         ({"scst": {}, "smiles": 1.0}, "unknown objective 'smiles'")):
        with pytest.raises(ValueError, match=message):
            steps.check_objective(bad)


def test_prefix_rollouts_end_at_eos_or_the_stop_token(tmp_path):
    import shutil

    from models import PrefixCaptioner

    source = FIXTURES / "clipcap_original"  # the original ClipCap fixture's tiny GPT-2 BPE (453 ids)
    (tmp_path / "tok").mkdir()
    shutil.copy(source / "gpt2_vocab.json", tmp_path / "tok" / "vocab.json")
    shutil.copy(source / "gpt2_merges.txt", tmp_path / "tok" / "merges.txt")
    torch.manual_seed(0)
    captioner = PrefixCaptioner.build(
        {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 453},
        {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "projection_dim": 16},
        tokenizer=tmp_path / "tok", prefix={"prefix_length": 2}).eval()
    ids = captioner.sample_ids(_images(2), num_samples=3, max_new_tokens=10)
    mask = captioner.sequence_mask(ids)
    ends = {captioner.tokenizer.eos_token_id, captioner.stop_token_id}
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        length = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
        assert row_mask == [1] * length + [0] * (len(row) - length)
    targets = captioner.build_targets(ids, mask)
    logits = captioner(_images(2), ids, mask, image_index=torch.arange(2).repeat_interleave(3))
    assert logits.shape[:2] == targets.shape


# Gradient accumulation ------------------------------------------------------------------------------------------


def _without_dropout(captioner):
    for module in captioner.modules():  # one function for every split of the batch
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return captioner.train()


def _optimiser_step(captioner, step, images, captions, image_ids, micro_batch_size):
    """One optimiser step from a copy of ``captioner``: (loss, gradients, parameters after the step, parts).

    The step is SGD, whose update is linear in the gradient, so equal gradients give equal parameters; AdamW's
    first step is ``lr * sign(g)`` and turns float rounding on near-zero gradient entries into full-size updates.
    """
    model = copy.deepcopy(captioner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad(set_to_none=True)
    loss, parts, _, finite = steps.accumulate_gradients(model, model, step, images, captions, image_ids,
                                                        micro_batch_size=micro_batch_size)
    assert finite
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return loss, grads, [p.detach().clone() for p in model.parameters()], parts


def _assert_same_step(first, second):
    (loss_a, grads_a, params_a, _), (loss_b, grads_b, params_b, _) = first, second
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


_CAPTIONS = ["a dog", "a small white cat on a wooden table", "two people", "a red bus parked at the side of a road",
             "a man riding a wave on top of a surfboard", "a bowl of fruit", "a plane", "a train at a station"]


@pytest.mark.parametrize("objective", ["mle", {"mle": 0.3, "smile": 0.7}])
def test_micro_batches_of_8_times_4_equal_one_batch_of_32(fixture_captioner, objective):
    """Batch 32 accumulated as 4 micro-batches of 8 gives the same loss, gradients and
    parameters as batch 32 in one step. The captions' lengths differ, so a mean of micro-batch means would not
    match (checked below); the token-weighted shares do."""
    captioner = _without_dropout(fixture_captioner)
    images, captions, ids = _images(32), _CAPTIONS * 4, torch.arange(32)
    step = steps.TeacherForcedStep(CaptionObjective(objective))
    whole = _optimiser_step(captioner, step, images, captions, ids, None)
    _assert_same_step(_optimiser_step(captioner, step, images, captions, ids, 8), whole)
    _assert_same_step(_optimiser_step(captioner, step, images, captions, ids, 5), whole)  # 5, 5, ..., 2
    whole_loss = whole[0]
    # The one-call form is the whole batch as one micro-batch.
    direct, _, _ = step(captioner, captioner, images, captions, ids)
    torch.testing.assert_close(direct.detach(), whole_loss, rtol=1e-6, atol=1e-7)
    # A plain mean of the micro-batch means differs (the captions' lengths vary per micro-batch of 5).
    plain = torch.stack([step(captioner, captioner, images[a:b], captions[a:b], ids[a:b])[0].detach()
                         for a, b in steps.micro_batch_bounds(32, 5)])
    sizes = torch.tensor([b - a for a, b in steps.micro_batch_bounds(32, 5)], dtype=torch.float32)
    assert abs(float((plain * sizes).sum() / 32) - float(whole_loss)) > 1e-4


@pytest.mark.parametrize("normalize", ["tokens", "none"])
def test_scst_with_smile_accumulates_exactly(fixture_captioner, monkeypatch, normalize):
    """SCST + SMILE over micro-batches equals the whole batch: the policy-gradient term is shared by sampled
    tokens (or sequences), the SMILE term by reference tokens. Sampling is made batch-independent (each image's
    rollouts are its greedy caption, repeated) so that both runs score the same captions."""
    captioner = _without_dropout(fixture_captioner)
    original = type(captioner).sample_ids

    def per_image_rollouts(self, images, num_samples=1, max_new_tokens=20, greedy=False):
        ids = original(self, images, max_new_tokens=max_new_tokens, greedy=True)
        return ids.repeat_interleave(num_samples, dim=0)

    monkeypatch.setattr(type(captioner), "sample_ids", per_image_rollouts)
    scst, token_spec = steps.split_objective(
        {"scst": {"samples": 2, "max_tokens": 6, "baseline": "mean_of_others", "normalize": normalize}, "smile": 0.5})
    step = steps.ScstStep(scst, CaptionObjective(token_spec), _RowReward())
    images, captions, ids = _images(8, seed=1), _CAPTIONS, torch.arange(8)
    whole = _optimiser_step(captioner, step, images, captions, ids, None)
    assert float(whole[0]) != 0.0
    _assert_same_step(_optimiser_step(captioner, step, images, captions, ids, 3), whole)


class _RowReward(_ConstantReward):
    """Reward = the rollout's position within its image (0, 1, ...) plus its image key / 10: non-zero advantages
    even when an image's rollouts are the same caption, and the same values however the batch is split."""

    def __call__(self, captions, image_index, images=None, keys=None):
        image_index = torch.as_tensor(image_index)
        first = torch.searchsorted(image_index, image_index)  # rows of an image are consecutive
        rank = torch.arange(len(captions)) - first
        value = rank.float() + torch.tensor([keys[i] for i in image_index.tolist()], dtype=torch.float32) / 10
        return value, {"cider_d": value}


def test_a_nonfinite_loss_skips_the_last_backward_and_says_so(fixture_captioner):
    captioner = _without_dropout(fixture_captioner)
    step = steps.TeacherForcedStep(CaptionObjective("mle"))
    asked = []
    loss, _, _, finite = steps.accumulate_gradients(
        captioner, captioner, step, _images(4), _CAPTIONS[:4], torch.arange(4), micro_batch_size=2,
        all_finite=lambda total: asked.append(float(total)) or False)
    assert not finite and len(asked) == 1 and asked[0] == pytest.approx(float(loss))
