"""Each objective against a direct, dense implementation of its definition, in value and gradient."""
import pytest
import torch
import torch.nn.functional as F

from models.objectives import IGNORE_INDEX, OBJECTIVES, CaptionObjective, random_subset, row_token_sets, smile

V = 50


def _inputs(seed=0, batch=4, length=9, vocab=V):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(1, vocab, (batch, length), generator=generator)
    targets[:, :2] = IGNORE_INDEX  # a prompt
    targets[1, 6:] = IGNORE_INDEX  # padding
    targets[2, 3:6] = targets[2, 2]  # repeated tokens
    return logits.requires_grad_(), targets


def _dense_subset_loss(logits, targets, support):
    """Cross-entropy with -inf outside ``support`` (B, N, V) bool; mean over non-ignored positions."""
    masked = logits.masked_fill(~support, float("-inf"))
    return F.cross_entropy(masked.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _row_support(targets, vocab):
    support = torch.zeros(targets.shape[0], vocab, dtype=torch.bool)
    for b, row in enumerate(targets):
        support[b, row[row != IGNORE_INDEX]] = True
    return support.unsqueeze(1).expand(-1, targets.shape[1], -1).clone()


def _first_positions(targets):
    return [int((row != IGNORE_INDEX).nonzero()[0]) for row in targets]


def naive_smile(logits, targets, first_token_mle=True):
    support = _row_support(targets, logits.shape[-1])
    if first_token_mle:
        for b, t in enumerate(_first_positions(targets)):
            support[b, t] = True
    return _dense_subset_loss(logits, targets, support)


def naive_reverse(logits, targets):
    support = ~_row_support(targets, logits.shape[-1])
    safe = targets.clamp(min=0).unsqueeze(2)
    support.scatter_(2, safe, True)
    return _dense_subset_loss(logits, targets, support)


def naive_random(logits, targets, num_samples):
    batch, length, vocab = logits.shape
    draws = torch.randint(vocab, (batch, length, num_samples))
    support = torch.zeros(batch, length, vocab, dtype=torch.bool)
    support.scatter_(2, draws, True)
    support.scatter_(2, targets.clamp(min=0).unsqueeze(2), True)
    return _dense_subset_loss(logits, targets, support)


def _value_and_grad(fn, logits, targets, **options):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, targets, **options)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def _assert_same(ours, reference):
    torch.testing.assert_close(ours[0], reference[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ours[1], reference[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mle_is_label_smoothed_cross_entropy(label_smoothing):
    logits, targets = _inputs()
    ours = _value_and_grad(OBJECTIVES["mle"], logits, targets, label_smoothing=label_smoothing)
    log_probs = logits.detach().clone().requires_grad_()
    lp = log_probs.log_softmax(-1)
    valid = targets != IGNORE_INDEX
    nll = -lp.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    smooth = -lp.mean(-1)
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth
    loss = per_token[valid].mean()
    _assert_same(ours, (loss.detach(), torch.autograd.grad(loss, log_probs)[0]))


@pytest.mark.parametrize("first_token_mle", [True, False])
def test_smile_equals_dense_mask_definition(first_token_mle):
    logits, targets = _inputs(seed=1)
    _assert_same(
        _value_and_grad(smile, logits, targets, first_token_mle=first_token_mle),
        _value_and_grad(naive_smile, logits, targets, first_token_mle=first_token_mle),
    )


def test_smile_equals_seed_reference_code():
    """The SMILE repo's BLIP code: labels padded with 0, mask column 0 cleared, first position full vocabulary."""
    logits, targets = _inputs(seed=2)
    prompt = 2
    shifted_logits = logits[:, prompt:].detach()
    label = targets[:, prompt:].clamp(min=0)  # pad id 0, as in BLIP's input_ids
    bs, n, vs = shifted_logits.shape
    logits_mask = torch.zeros(bs, vs).scatter_(1, label, True)
    logits_mask[:, 0] = 0
    logits_mask = logits_mask.unsqueeze(1).expand(-1, n, -1).clone()
    logits_mask[:, 0, :] = 1
    selected = shifted_logits.masked_fill(logits_mask == 0, float("-inf"))
    reference = F.cross_entropy(selected.reshape(-1, vs), label.reshape(-1), ignore_index=0)
    torch.testing.assert_close(smile(logits.detach(), targets), reference)


def test_smile_gradient_is_zero_outside_row_token_set():
    logits, targets = _inputs(seed=3)
    _, grad = _value_and_grad(smile, logits, targets)
    support = _row_support(targets, V)
    for b, t in enumerate(_first_positions(targets)):
        support[b, t] = True  # first-token MLE: the full vocabulary gets gradient there
    assert (grad[~support] == 0).all()
    assert (grad[support & (targets != IGNORE_INDEX).unsqueeze(2)] != 0).any()


def test_reverse_subset_equals_dense_definition():
    logits, targets = _inputs(seed=4)
    _assert_same(
        _value_and_grad(OBJECTIVES["reverse_subset"], logits, targets),
        _value_and_grad(naive_reverse, logits, targets),
    )


def test_random_subset_equals_dense_definition_with_same_draws():
    logits, targets = _inputs(seed=5, vocab=20)  # small vocabulary: draws collide with labels and each other

    def seeded(fn, *args, **kwargs):
        torch.manual_seed(123)
        return fn(*args, **kwargs)

    ours = _value_and_grad(lambda l, t: seeded(random_subset, l, t, num_samples=10), logits, targets)
    reference = _value_and_grad(lambda l, t: seeded(naive_random, l, t, 10), logits, targets)
    _assert_same(ours, reference)


def test_row_token_sets_are_sorted_unique_tokens():
    targets = torch.tensor([[IGNORE_INDEX, 7, 3, 7, 9, IGNORE_INDEX]])
    ids, valid = row_token_sets(targets)
    assert ids[valid].tolist() == [3, 7, 9]


def test_mixture_is_weighted_sum_of_parts():
    logits, targets = _inputs(seed=6)
    objective = CaptionObjective({"mle": 0.01, "smile": {"weight": 0.99, "first_token_mle": False}})
    total, parts = objective(logits, targets)
    expected = 0.01 * OBJECTIVES["mle"](logits, targets) + 0.99 * smile(logits, targets, first_token_mle=False)
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"mle", "smile"}
    single, _ = CaptionObjective("smile")(logits, targets)
    torch.testing.assert_close(single, smile(logits, targets))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("smiley", "valid names: ['mle', 'random_subset', 'reverse_subset', 'smile']"),
        ({"smile": {"first_token": False}}, "valid options: ['weight', 'first_token_mle']"),
        ({"mle": -1}, "non-negative"),
        ({}, "valid names"),
    ],
)
def test_bad_objective_specs_fail_with_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CaptionObjective(spec)


def test_objectives_accept_bf16_logits():
    logits, targets = _inputs(seed=7)
    for name, fn in OBJECTIVES.items():
        loss = fn(logits.detach().to(torch.bfloat16), targets)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
