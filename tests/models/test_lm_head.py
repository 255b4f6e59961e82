"""The SMILE-aware LM head: same loss and gradients as SMILE on the full (B, N, V) logits, without those logits."""
import copy

import pytest
import torch

from models import IGNORE_INDEX, CaptionObjective
from models.objectives import HeadFeatures, caption_loss, smile, smile_from_features
from tests.conftest import FIXTURES

CAPTIONS = ["a dog", "a small white cat on a table", "two red balls on the grass a dog"]


def _feature_inputs(seed=0, batch=4, length=9, width=6, vocab=50):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, length, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
    bias = torch.randn(vocab, generator=generator, dtype=torch.float64)
    targets = torch.randint(1, vocab, (batch, length), generator=generator)
    targets[:, :2] = IGNORE_INDEX  # a prompt
    targets[1, 6:] = IGNORE_INDEX  # padding
    targets[2, 3:6] = targets[2, 2]  # repeated tokens
    targets[3] = IGNORE_INDEX  # a row with nothing to score
    return features, weight, bias, targets


def _loss_and_grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*tensors)
    return loss.detach(), torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("first_token_mle", [True, False])
def test_smile_from_features_equals_smile_on_full_logits(first_token_mle):
    features, weight, bias, targets = _feature_inputs()
    ours = _loss_and_grads(lambda f, w, b: smile_from_features(f, w, b, targets, first_token_mle), [features, weight, bias])
    full = _loss_and_grads(lambda f, w, b: smile(f @ w.T + b, targets, first_token_mle), [features, weight, bias])
    torch.testing.assert_close(ours[0], full[0], atol=1e-12, rtol=1e-12)
    for mine, reference in zip(ours[1], full[1]):
        torch.testing.assert_close(mine, reference, atol=1e-12, rtol=1e-12)


def test_smile_from_features_without_bias_and_with_no_targets():
    features, weight, _, targets = _feature_inputs(seed=1)
    torch.testing.assert_close(smile_from_features(features, weight, None, targets), smile(features @ weight.T, targets))
    nothing = torch.full_like(targets, IGNORE_INDEX)
    loss, grads = _loss_and_grads(lambda f: smile_from_features(f, weight, None, nothing), [features])
    assert loss == 0 and (grads[0] == 0).all()


def test_caption_objective_dispatch():
    assert CaptionObjective("smile").supports_features
    assert CaptionObjective({"smile": {"weight": 0.5, "first_token_mle": False}}).supports_features
    assert not CaptionObjective("mle").supports_features
    assert not CaptionObjective({"mle": 0.01, "smile": 0.99}).supports_features
    features, weight, bias, targets = _feature_inputs(seed=2)
    with pytest.raises(ValueError, match="need.*full logits"):
        CaptionObjective({"mle": 0.01, "smile": 0.99}).from_features(features, weight, bias, targets)
    total, parts = CaptionObjective({"smile": {"weight": 0.5, "first_token_mle": False}}).from_features(
        features, weight, bias, targets)
    torch.testing.assert_close(total, 0.5 * smile(features @ weight.T + bias, targets, first_token_mle=False))
    assert set(parts) == {"smile"}


def _captioner(attention="sdpa"):
    from models import BlipCaptioner

    torch.manual_seed(0)
    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt", attention=attention)
    return captioner.double()


def _batch(captioner):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    return images, input_ids, attention_mask, captioner.build_targets(input_ids, attention_mask)


def _step(captioner, objective, plain, seed=0):
    images, input_ids, attention_mask, targets = _batch(captioner)
    captioner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if plain:
        loss, parts = objective(captioner(images, input_ids, attention_mask), targets)
    else:
        loss, parts = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in captioner.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, grads


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("spec", ["smile", {"smile": {"weight": 0.7, "first_token_mle": False}}])
def test_forward_with_smile_objective_matches_plain_path_in_loss_and_every_gradient(mode, spec):
    captioner = _captioner()
    captioner.train(mode == "train")  # train: dropout draws the same masks in both paths (same seed, same order)
    objective = CaptionObjective(spec)
    plain = _step(captioner, objective, plain=True)
    fast = _step(captioner, objective, plain=False)
    torch.testing.assert_close(fast[0], plain[0], atol=1e-12, rtol=1e-10)
    assert fast[1].keys() == plain[1].keys()
    trainable = {name for name, p in captioner.named_parameters() if p.requires_grad}
    assert set(plain[2]) == trainable and set(fast[2]) == trainable  # every parameter gets its gradient
    for name in trainable:
        torch.testing.assert_close(fast[2][name], plain[2][name], atol=1e-10, rtol=1e-8, msg=name)


def test_mixture_with_mle_uses_plain_logits(monkeypatch):
    captioner = _captioner().eval()
    objective = CaptionObjective({"mle": 0.01, "smile": 0.99})
    monkeypatch.setattr(CaptionObjective, "from_features", lambda *a, **k: pytest.fail("feature path used"))
    plain = _step(captioner, objective, plain=True)
    fused = _step(captioner, objective, plain=False)
    assert torch.equal(fused[0], plain[0]) and set(fused[1]) == {"mle", "smile"}


def test_forward_returns_logits_or_the_head_features_that_make_them():
    captioner = _captioner().eval()
    images, input_ids, attention_mask, targets = _batch(captioner)
    logits = captioner(images, input_ids, attention_mask)
    assert logits.shape == (*targets.shape, len(captioner.tokenizer))
    head = captioner(images, input_ids, attention_mask, head_features=True)
    assert isinstance(head, HeadFeatures) and head.features.shape[:2] == targets.shape
    torch.testing.assert_close(head.features @ head.weight.T + head.bias, logits)


def test_feature_path_under_cpu_bf16_autocast_is_close_to_fp32():
    captioner = _captioner().float().eval()
    images, input_ids, attention_mask, targets = _batch(captioner)
    images, objective = images.float(), CaptionObjective("smile")
    with torch.no_grad():
        reference, _ = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, atol=5e-2, rtol=2e-2)


def test_feature_path_through_ddp_matches_plain():
    """The training step's call: ``caption_loss`` on the DDP-wrapped module (1-process gloo group); the head's
    weight comes out of DDP's forward and its gradient is reduced like every other."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        captioner = _captioner().eval()
        objective = CaptionObjective("smile")
        plain = _step(captioner, objective, plain=True)
        model = DistributedDataParallel(copy.deepcopy(captioner))
        images, input_ids, attention_mask, targets = _batch(captioner)
        loss, parts = caption_loss(model, objective, images, input_ids, attention_mask, targets)
        loss.backward()
        torch.testing.assert_close(loss.detach(), plain[0])
        for name, param in model.module.named_parameters():
            torch.testing.assert_close(param.grad, plain[2][name], atol=1e-10, rtol=1e-8, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feature_path_matches_plain_on_cuda_bf16():
    captioner = _captioner().float().cuda().eval()
    images, input_ids, attention_mask, targets = _batch(captioner)
    images, objective = images.float().cuda(), CaptionObjective("smile")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast, _ = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
        plain, _ = objective(captioner(images, input_ids, attention_mask), targets)
    torch.testing.assert_close(fast, plain, atol=5e-2, rtol=2e-2)


def test_smile_from_features_allocates_the_weight_gradient_once():
    """At VLM vocabularies the (V, D) gradient of the head's weight is the step's largest tensor (2.2 GB at
    Qwen2-VL-7B's size). SMILE's backward allocates it once, as MLE's head does, not once per use of the weight (the
    token-set gather and the first positions' projection) plus their sum: otherwise SMILE's peak memory exceeds
    MLE's (benchmarks/bench_vlm_vocab.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    features, weight, bias, targets = _feature_inputs(vocab=300, width=7)
    weight.requires_grad_()

    class VocabularySized(TorchDispatchMode):
        storages: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.shape == weight.shape:
                    self.storages.add(tensor.untyped_storage().data_ptr())
            return out

    loss = smile_from_features(features.requires_grad_(), weight, bias.requires_grad_(), targets)
    with VocabularySized() as mode:
        (grad,) = torch.autograd.grad(loss, [weight])
    assert mode.storages - {weight.untyped_storage().data_ptr()} == {grad.untyped_storage().data_ptr()}
