"""SDPA attention (models/attention.py) against transformers' eager BLIP attention: outputs, cache, dropout, fallbacks."""
import copy
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from models import BlipCaptioner, attention_of, set_attention
from models.attention import SdpaBlipAttention, SdpaBlipTextSelfAttention, _sdpa_mask, sdpa_supported
from tests.conftest import FIXTURES, fixture_architecture

REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements.txt"


def _declared_transformers_range() -> SpecifierSet:
    for line in REQUIREMENTS.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement.startswith("transformers"):
            return SpecifierSet(requirement[len("transformers"):].strip())
    raise AssertionError(f"{REQUIREMENTS} names no transformers range")


def test_sdpa_is_supported_on_every_transformers_the_requirements_allow():
    """Never skipped: inside the declared range the fast path must be on, or CI fails (a silent fallback to eager
    would also turn every parity test below into eager-versus-eager)."""
    installed = Version(transformers.__version__)
    declared = _declared_transformers_range()
    assert installed in declared, f"transformers {installed} is outside requirements.txt's {declared}"
    assert sdpa_supported(), f"models/attention.py does not cover transformers {installed}'s BLIP attention"
    captioner = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt")
    assert captioner.attention == "sdpa"

CAPTIONS = ["a dog", "a small white cat on a table", "two red balls on the grass"]  # ragged: padding


def _pair(captioner):
    """(sdpa, eager) copies of one captioner: the same weights."""
    sdpa = copy.deepcopy(captioner).set_attention("sdpa")
    eager = copy.deepcopy(captioner).set_attention("eager")
    return sdpa, eager


def _images(batch, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_build_selects_sdpa_by_default_and_keeps_state_dict_names():
    torch.manual_seed(0)
    sdpa = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt")
    torch.manual_seed(0)
    eager = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt", attention="eager")
    assert sdpa.attention == "sdpa" and eager.attention == "eager"
    assert isinstance(sdpa.model.vision_model.encoder.layers[0].self_attn, SdpaBlipAttention)
    layer = sdpa.model.text_decoder.bert.encoder.layer[0]
    assert isinstance(layer.attention.self, SdpaBlipTextSelfAttention)
    assert isinstance(layer.crossattention.self, SdpaBlipTextSelfAttention)
    sdpa_state, eager_state = sdpa.model.state_dict(), eager.model.state_dict()
    assert list(sdpa_state) == list(eager_state)
    assert all(torch.equal(sdpa_state[key], eager_state[key]) for key in sdpa_state)
    # Switching changes nothing but the modules' class, and reports what is now in use.
    assert set_attention(sdpa.model, "eager") == "eager" and attention_of(sdpa.model) == "eager"
    assert list(sdpa.model.state_dict()) == list(eager_state)
    set_attention(sdpa.model.text_decoder, "sdpa")
    assert attention_of(sdpa.model) == "mixed"
    with pytest.raises(ValueError, match=r"\['sdpa', 'eager'\]"):
        BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt", attention="flash")


def test_sdpa_matches_eager_vision_and_text_with_padding(fixture_captioner):
    sdpa, eager = _pair(fixture_captioner)
    images = _images(len(CAPTIONS))
    input_ids, attention_mask = sdpa.tokenize(CAPTIONS)
    assert (attention_mask == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(sdpa.encode_images(images), eager.encode_images(images), atol=1e-5, rtol=0)
        # Every position, padded ones included: the padding mask reaches SDPA as eager applies it.
        torch.testing.assert_close(sdpa(images, input_ids, attention_mask), eager(images, input_ids, attention_mask),
                                   atol=1e-5, rtol=0)


def test_sdpa_matches_eager_with_masked_image_tokens(fixture_captioner):
    """Cross-attention with an encoder padding mask (BLIP never pads image tokens; other callers may)."""
    sdpa, eager = _pair(fixture_captioner)
    input_ids, attention_mask = sdpa.tokenize(CAPTIONS)
    image_embeds = sdpa.encode_images(_images(len(CAPTIONS)))
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    image_mask[0, -2:] = 0
    outputs = [
        model.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask, use_cache=False).logits.detach()
        for model in (sdpa, eager)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)


def test_beam_search_identical_with_eager_and_sdpa(fixture_captioner, blip_fixture):
    config = blip_fixture["config"]
    options = dict(num_beams=config["num_beams"], max_length=config["max_length"], min_length=config["min_length"])
    sdpa, eager = _pair(fixture_captioner)
    generated = [model.generate_ids(blip_fixture["pixel_values"], **options) for model in (sdpa, eager)]
    assert torch.equal(generated[0], generated[1])
    assert torch.equal(generated[0], blip_fixture["generated_ids"])  # and both equal the original BLIP code's
    assert sdpa.generate(blip_fixture["pixel_values"], **options) == blip_fixture["generated_captions"]


def test_kv_cache_steps_match_full_forward_under_sdpa(fixture_captioner):
    """Feeding tokens one by one through the 5.x EncoderDecoderCache gives the full forward's logits, and the
    cross-attention keys/values are projected once (then reused), as in the eager module."""
    captioner = fixture_captioner
    assert captioner.attention == "sdpa"
    decoder = captioner.model.text_decoder
    input_ids, attention_mask = captioner.tokenize(["a small white cat on a table", "a dog on the grass"])
    image_embeds = captioner.encode_images(_images(2))
    with torch.no_grad():
        full = decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                       use_cache=False).logits
        calls = []
        hooks = [layer.crossattention.self.key.register_forward_hook(lambda *_: calls.append(1))
                 for layer in decoder.bert.encoder.layer]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        prefix = 4
        out = decoder(input_ids=input_ids[:, :prefix], attention_mask=attention_mask[:, :prefix],
                      encoder_hidden_states=image_embeds, past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prefix, input_ids.shape[1]):
            out = decoder(input_ids=input_ids[:, t : t + 1], attention_mask=attention_mask[:, : t + 1],
                          encoder_hidden_states=image_embeds, past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert len(calls) == len(decoder.bert.encoder.layer)  # image keys projected once per layer, then cached
    assert out.past_key_values.get_seq_length() == input_ids.shape[1]


def test_generation_with_and_without_cache_agree_under_sdpa(fixture_captioner, blip_fixture):
    decoder = fixture_captioner.model.text_decoder
    image_embeds = fixture_captioner.encode_images(blip_fixture["pixel_values"])
    prompt_ids = fixture_captioner.tokenize([""] * 4)[0][:, :-1]
    options = dict(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), encoder_hidden_states=image_embeds,
                   num_beams=3, max_length=20, min_length=5, eos_token_id=fixture_captioner.tokenizer.sep_token_id,
                   pad_token_id=0, do_sample=False)
    with torch.no_grad():
        cached = decoder.generate(use_cache=True, **options)
        uncached = decoder.generate(use_cache=False, **options)
    assert torch.equal(cached, uncached)


def test_training_mode_applies_attention_dropout_in_sdpa(fixture_captioner):
    captioner = copy.deepcopy(fixture_captioner)
    images = _images(len(CAPTIONS))
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = captioner(images, input_ids, attention_mask)
    # Only attention dropout active: any train/eval difference comes from SDPA's dropout_p.
    for name, module in captioner.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3 if name.endswith("self.dropout") else 0.0
    captioner.train()

    def run(seed):
        torch.manual_seed(seed)
        return captioner(images, input_ids, attention_mask)

    first = run(0)
    assert torch.equal(first, run(0))  # deterministic given the seed
    assert not torch.allclose(first, run(1))
    assert not torch.allclose(first, reference)
    first.logsumexp(-1).mean().backward()
    grads = [p.grad for p in captioner.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for module in captioner.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(captioner(images, input_ids, attention_mask), reference, atol=1e-5, rtol=0)


def test_attention_weights_requested_fall_back_to_eager(fixture_captioner):
    sdpa, eager = _pair(fixture_captioner)
    images = _images(2)
    input_ids, attention_mask = sdpa.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        vision = [m.model.vision_model(pixel_values=images, output_attentions=True) for m in (sdpa, eager)]
        image_embeds = vision[1].last_hidden_state
        text = [m.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                     encoder_hidden_states=image_embeds, output_attentions=True) for m in (sdpa, eager)]
    layers = fixture_architecture().vision_layers
    assert len(vision[0].attentions) == layers
    for ours, theirs in zip(vision[0].attentions, vision[1].attentions):
        torch.testing.assert_close(ours, theirs)
    for key in ("attentions", "cross_attentions"):
        assert len(getattr(text[0], key)) == fixture_architecture().text_layers
        for ours, theirs in zip(getattr(text[0], key), getattr(text[1], key)):
            torch.testing.assert_close(ours, theirs)


def test_sdpa_model_saves_as_plain_blip(fixture_captioner, tmp_path):
    """save_pretrained of an SDPA captioner writes a standard BLIP directory that loads back (eager) unchanged."""
    from transformers import BlipForConditionalGeneration

    assert fixture_captioner.attention == "sdpa"
    fixture_captioner.model.save_pretrained(tmp_path)
    loaded = BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert attention_of(loaded) == "eager"
    images = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vision_model(pixel_values=images).last_hidden_state,
                                   fixture_captioner.encode_images(images), atol=1e-5, rtol=0)


def test_low_precision_mask_stays_finite():
    mask = torch.tensor([[0.0, torch.finfo(torch.float32).min]])
    half = _sdpa_mask(mask, torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all() and half[0, 1] == torch.finfo(torch.float16).min
    assert _sdpa_mask(mask, torch.float32) is mask
    assert _sdpa_mask(None, torch.float16) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_matches_eager_under_bf16_autocast_on_cuda(fixture_captioner, blip_fixture):
    sdpa, eager = (m.cuda() for m in _pair(fixture_captioner))
    images = _images(len(CAPTIONS)).cuda()
    input_ids, attention_mask = sdpa.tokenize(CAPTIONS)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours, theirs = (m(images, input_ids, attention_mask).float() for m in (sdpa, eager))
    torch.testing.assert_close(ours, theirs, atol=5e-2, rtol=5e-2)
    config = blip_fixture["config"]
    options = dict(num_beams=config["num_beams"], max_length=config["max_length"], min_length=config["min_length"])
    pixel_values = blip_fixture["pixel_values"].cuda()
    assert torch.equal(sdpa.generate_ids(pixel_values, **options), eager.generate_ids(pixel_values, **options))
