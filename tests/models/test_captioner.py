"""Parity with the ORIGINAL salesforce/BLIP caption code (tests/fixtures/README.md) and BLIP's text layout."""
import pytest
import torch

from models import IGNORE_INDEX, BlipCaptioner
from models.objectives import mle, smile
from tests.conftest import FIXTURES


def _fixture_inputs(captioner, blip_fixture):
    prompt = blip_fixture["config"]["prompt"]
    captions = [text[len(prompt):] for text in blip_fixture["captions"]]
    return captioner.tokenize(captions)


def test_tokenize_matches_blip(fixture_captioner, blip_fixture):
    input_ids, attention_mask = _fixture_inputs(fixture_captioner, blip_fixture)
    assert torch.equal(input_ids, blip_fixture["input_ids"])
    assert torch.equal(attention_mask, blip_fixture["attention_mask"])
    assert fixture_captioner.prompt_length == blip_fixture["config"]["prompt_length"]
    assert len(fixture_captioner.tokenizer) == blip_fixture["config"]["vocab_size"]
    assert fixture_captioner.tokenizer.bos_token_id == blip_fixture["config"]["bos_token_id"]


def test_image_embeddings_and_logits_match_original(fixture_captioner, blip_fixture):
    input_ids, attention_mask = _fixture_inputs(fixture_captioner, blip_fixture)
    with torch.no_grad():
        image_embeds = fixture_captioner.encode_images(blip_fixture["pixel_values"])
        logits = fixture_captioner(blip_fixture["pixel_values"], input_ids, attention_mask)
    torch.testing.assert_close(image_embeds, blip_fixture["image_embeds"], atol=1e-4, rtol=0)
    # The fixture stores unshifted scores (B, L, V); ours drop the last position, which predicts nothing.
    torch.testing.assert_close(logits, blip_fixture["logits"][:, :-1], atol=1e-4, rtol=0)


def test_losses_match_original(fixture_captioner, blip_fixture):
    input_ids, attention_mask = _fixture_inputs(fixture_captioner, blip_fixture)
    with torch.no_grad():
        logits = fixture_captioner(blip_fixture["pixel_values"], input_ids, attention_mask)
    targets = fixture_captioner.build_targets(input_ids, attention_mask)
    expected_mle = blip_fixture["mle_loss_label_smoothing_0.1"]
    assert abs(mle(logits, targets, label_smoothing=0.1).item() - expected_mle.item()) < 1e-5
    assert abs(smile(logits, targets).item() - blip_fixture["smile_loss"].item()) < 1e-5


def test_beam_search_matches_original(fixture_captioner, blip_fixture):
    config = blip_fixture["config"]
    options = dict(num_beams=config["num_beams"], max_length=config["max_length"], min_length=config["min_length"])
    generated = fixture_captioner.generate_ids(blip_fixture["pixel_values"], **options)
    assert torch.equal(generated, blip_fixture["generated_ids"])
    assert fixture_captioner.generate(blip_fixture["pixel_values"], **options) == blip_fixture["generated_captions"]


def test_nucleus_sampling_returns_one_caption_per_image(fixture_captioner, blip_fixture):
    torch.manual_seed(0)
    captions = fixture_captioner.generate(blip_fixture["pixel_values"], sample=True, top_p=0.9, max_length=20, min_length=5)
    assert len(captions) == 4 and all(isinstance(c, str) and c for c in captions)
    assert not any(c.startswith("a picture of") for c in captions)


def test_build_targets_masks_prompt_and_padding(fixture_captioner):
    input_ids, attention_mask = fixture_captioner.tokenize(["a dog", "a small white cat on a table"])
    targets = fixture_captioner.build_targets(input_ids, attention_mask)
    assert targets.shape == (2, input_ids.shape[1] - 1)
    prompt_targets = fixture_captioner.prompt_length - 1  # bos predicts "a", "a" predicts "picture", ...
    assert (targets[:, :prompt_targets] == IGNORE_INDEX).all()
    # The first scored target is the first caption word; the last scored one is [SEP].
    assert targets[0, prompt_targets] == input_ids[0, fixture_captioner.prompt_length]
    first_row = targets[0][targets[0] != IGNORE_INDEX]
    assert first_row[-1] == fixture_captioner.tokenizer.sep_token_id
    assert (targets[0, len(first_row) + prompt_targets:] == IGNORE_INDEX).all()


def test_truncates_at_max_text_length(fixture_captioner):
    input_ids, _ = fixture_captioner.tokenize(["a dog " * 50])
    assert input_ids.shape[1] == fixture_captioner.max_text_length


@pytest.mark.parametrize("preset", ["tiny"])
def test_presets_train_step_and_gradient_checkpointing(preset):
    torch.manual_seed(0)
    captioner = BlipCaptioner.build(preset, image_size=32, tokenizer=FIXTURES / "vocab.txt", gradient_checkpointing=True)
    input_ids, attention_mask = captioner.tokenize(["a red ball", "two dog on the grass"])
    logits = captioner(torch.randn(2, 3, 32, 32), input_ids, attention_mask)
    assert logits.shape == (2, input_ids.shape[1] - 1, len(captioner.tokenizer))
    mle(logits, captioner.build_targets(input_ids, attention_mask)).backward()
    assert captioner.model.vision_model.embeddings.patch_embedding.weight.grad is not None


def test_random_vit_is_initialised_as_blips_vit():
    """BLIP's vit.py draws the ViT's linear weights and its position and class embeddings from N(0, 0.02) and
    sets LayerNorms to (1, 0). transformers' BlipVisionConfig default (1e-10) left every vision weight of a
    from-scratch model (the toy pre-training) at ~0; the decoder (BERT, 0.02) was never affected."""
    torch.manual_seed(0)
    vision = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt").model.vision_model
    embeddings, layer = vision.embeddings, vision.encoder.layers[0]
    for weight in (embeddings.position_embedding, embeddings.class_embedding, embeddings.patch_embedding.weight,
                   layer.self_attn.qkv.weight, layer.self_attn.projection.weight, layer.mlp.fc1.weight,
                   layer.mlp.fc2.weight):
        assert 0.015 < weight.detach().std().item() < 0.025
    assert torch.equal(layer.layer_norm1.weight.detach(), torch.ones(64))
    assert torch.equal(layer.layer_norm1.bias.detach(), torch.zeros(64))


def test_large_preset_cross_attends_from_1024_wide_image_tokens():
    from models.captioner import ARCHITECTURES, build_blip_config, build_tokenizer

    config = build_blip_config(ARCHITECTURES["large"], 384, build_tokenizer(FIXTURES / "vocab.txt"))
    assert config.vision_config.hidden_size == 1024 and config.text_config.encoder_hidden_size == 1024
    assert config.text_config.hidden_size == 768


@pytest.mark.parametrize("scope", ["vision", "full"])
def test_compile_keeps_parameter_names_and_outputs(scope):
    torch.manual_seed(0)
    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt").eval()
    names = list(captioner.state_dict())
    images = torch.randn(2, 3, 32, 32)
    input_ids, attention_mask = captioner.tokenize(["a red ball", "two dog on the grass"])
    with torch.no_grad():
        eager = captioner(images, input_ids, attention_mask)
        # aot_eager traces through dynamo and AOTAutograd like inductor does, without needing a C++ compiler.
        captioner.compile_parts(scope, backend="aot_eager")
        compiled = captioner(images, input_ids, attention_mask)
    assert list(captioner.state_dict()) == names
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["mle", "smile", {"mle": 0.01, "smile": 0.99}, {"smile": {"first_token_mle": False}}])
def test_padding_to_buckets_or_max_length_changes_shapes_not_losses(spec):
    from models import CaptionObjective
    from models.objectives import caption_loss

    torch.manual_seed(0)
    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt").eval()
    images, captions = torch.randn(3, 3, 32, 32), ["a red ball", "two dog on the grass", "a"]
    objective = CaptionObjective(spec)
    losses = {}
    lengths = {}
    for padding in ("longest", "bucket", "max_length"):
        captioner.text_padding = padding
        input_ids, attention_mask = captioner.tokenize(captions)
        targets = captioner.build_targets(input_ids, attention_mask)
        losses[padding], _ = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
        lengths[padding] = input_ids.shape[1]
    # "a caption ..." prompt + 5 words + [SEP] = 10 tokens -> bucket 16 -> 40 (max_text_length).
    assert lengths == {"longest": 10, "bucket": 16, "max_length": captioner.max_text_length}
    torch.testing.assert_close(losses["bucket"], losses["longest"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses["max_length"], losses["longest"], atol=1e-6, rtol=1e-6)
    # Generation builds its prompt without padding, whatever the training padding is.
    generated = captioner.generate_ids(images, num_beams=2, max_length=10, min_length=3)
    captioner.text_padding = "longest"
    assert torch.equal(generated, captioner.generate_ids(images, num_beams=2, max_length=10, min_length=3))
