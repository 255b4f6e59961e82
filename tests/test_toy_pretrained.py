"""Tests for toy_pretrained/: the toy CLIP, GPT-2 and VLM build, cache, load through metrics/ and the captioner
families, and are wired in.

Tiny recipes on a handful of toy images, so each build takes a second or two; the real recipes' quality (the
toy CLIP's retrieval, the toy GPT-2's perplexities, the toy VLM's val captions) is measured by the builds
themselves (docs/toy_study.md).
"""
import dataclasses
from pathlib import Path
import json

import pytest
import torch

import toy_pretrained
from data import toy
from metrics.clip_metrics import encode_texts, load_clip
from metrics.perplexity import caption_perplexities, load_language_model
from toy_pretrained import ToyClipRecipe, ToyGpt2Recipe, ToyVlmRecipe, ensure_for_config, ensure_toy_clip, \
    ensure_toy_gpt2, ensure_toy_vlm
from toy_pretrained import _build

TINY_CLIP = ToyClipRecipe(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp=64, projection_dim=16,
                          epochs=2, batch_size=8)
TINY_GPT2 = ToyGpt2Recipe(width=32, layers=1, heads=2, epochs=30, batch_size=10, lr=1e-2)
TINY_VLM = ToyVlmRecipe(width=32, layers=1, heads=2, mlp=64, epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return toy.ensure_toy_dataset(tmp_path_factory.mktemp("cache") / "toy", num_train=8, num_val=2, num_test=6,
                                  seed=2)["image_root"]


def test_toy_clip_builds_loads_and_tokenises_the_clipscore_prefix(toy_root):
    folder = ensure_toy_clip(toy_root.parent / "toy_clip", toy_root, TINY_CLIP)
    clip = load_clip(folder, "cpu")
    tokenizer = clip.tokenizer
    ids = tokenizer("A photo depicts a large red circle to the left on a grey background")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert clip.model.config.text_config.eos_token_id == tokenizer.eos_token_id != 2  # pooled at the first EOS
    # Padding (EOS) after the text changes nothing: CLIP pools at the first EOS.
    one = encode_texts(["a red circle"], clip, progress=False)
    batch = encode_texts(["a red circle", "a large red circle to the left on a grey background"], clip,
                         progress=False)
    torch.testing.assert_close(one[0], batch[0], atol=1e-5, rtol=0)
    report = json.loads((folder / "manifest.json").read_text())["report"]
    assert report["test_images"] == 6 and report["R@1_chance"] == pytest.approx(100 / 6, abs=0.05)
    assert 0 <= report["R@1_mean"] <= 100 and report["R@1_ceiling"] >= 100 / 6


def test_toy_clip_cache_reuse_rebuild_determinism_and_refusal(toy_root, tmp_path, monkeypatch):
    calls = []
    original = toy_pretrained.clip.build_toy_clip
    monkeypatch.setattr(toy_pretrained.clip, "build_toy_clip", lambda *a, **k: (calls.append(a), original(*a, **k))[1])
    first = ensure_toy_clip(tmp_path / "a", toy_root, TINY_CLIP)
    weights = (first / "model.safetensors").read_bytes()
    assert ensure_toy_clip(tmp_path / "a", toy_root, TINY_CLIP) == first and len(calls) == 1
    second = ensure_toy_clip(tmp_path / "b", toy_root, TINY_CLIP)
    assert (second / "model.safetensors").read_bytes() == weights  # seeded: the same weights again
    ensure_toy_clip(tmp_path / "a", toy_root, dataclasses.replace(TINY_CLIP, epochs=1))
    assert len(calls) == 3 and (first / "model.safetensors").read_bytes() != weights
    assert not list(tmp_path.glob(".a.*"))  # no temporary folders left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        ensure_toy_clip(foreign, toy_root, TINY_CLIP)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_toy_gpt2_learns_the_toy_grammar(toy_root):
    folder = ensure_toy_gpt2(toy_root.parent / "toy_gpt2", toy_root, TINY_GPT2)
    lm = load_language_model(folder, "cpu")
    assert lm.tokenizer.bos_token_id is not None
    assert lm.tokenizer("a red circle", add_special_tokens=False)["input_ids"] == \
        lm.tokenizer.convert_tokens_to_ids(["a", "red", "circle"])
    report = json.loads((folder / "manifest.json").read_text())["report"]
    # 40 training captions, 30 epochs: word order is learnt, so scrambled references are far less likely.
    assert report["PPL_references"] * 5 < report["PPL_shuffled_words"], report
    fluent, scrambled = caption_perplexities(["a red circle", "circle red a"], lm).tolist()
    assert fluent < scrambled


def test_ensure_for_config_builds_only_what_the_metrics_need(tmp_path, monkeypatch):
    calls = []
    for kind in toy_pretrained.TOY_BUILDERS:
        monkeypatch.setitem(toy_pretrained.TOY_BUILDERS, kind,
                            lambda folder, root, kind=kind: calls.append((kind, folder)))
    config = {"data": {"toy": True, "toy_root": str(tmp_path / "cache" / "toy")},
              "eval": {"metrics": ["coco", "ppl"], "clip_model": str(tmp_path / "cache" / "toy_clip"),
                       "ppl_model": str(tmp_path / "cache" / "toy_gpt2")}}
    ensure_for_config(config)
    assert calls == [("gpt2", tmp_path / "cache" / "toy_gpt2")]
    calls.clear()
    config["eval"].update(metrics=["retrieval", "ppl"], ppl_model="gpt2")  # a hub id is never built
    ensure_for_config(config)
    assert calls == [("clip", tmp_path / "cache" / "toy_clip")]
    calls.clear()
    own = tmp_path / "cache" / "my_clip"  # an existing folder of someone else's (no manifest): left alone
    own.mkdir(parents=True)
    config["eval"]["clip_model"] = str(own)
    ensure_for_config(config)
    config["data"]["toy"] = False
    config["eval"]["clip_model"] = str(tmp_path / "cache" / "toy_clip")
    ensure_for_config(config)
    assert calls == []


def test_word_level_tokenizer_rejects_a_special_that_is_a_word():
    with pytest.raises(ValueError, match="special token"):
        _build.word_level_tokenizer(["a", _build.UNK], [_build.EOS, _build.UNK], False, 8, _build.EOS,
                                    _build.EOS, _build.EOS)


def test_prefix_captioners_and_scst_rewards_also_ask_for_the_toy_models():
    import training
    from toy_pretrained import _needs

    configs = Path(__file__).resolve().parents[1] / "configs" / "toy"
    prefix = training.load_config(configs / "prefix_mle.yaml", ["eval.metrics=[coco]"])
    assert _needs(prefix) == {"clip": {"cache/toy_clip"}, "gpt2": {"cache/toy_gpt2"}, "vlm": set()}
    # eval.select_by=CIDEr: the row's own CLIPScore selection needs clipscore in eval.metrics
    scst = training.load_config(configs / "scst_clips.yaml", ["eval.metrics=[coco]", "eval.select_by=CIDEr"])
    assert _needs(scst) == {"clip": set(), "gpt2": set(), "vlm": set()}  # the reward's CLIP comes from the trainer:
    reward_clip = training.steps.reward_clip_model(scst["objective"])
    assert _needs(scst, reward_clip) == {"clip": {"cache/toy_clip"}, "gpt2": set(), "vlm": set()}
    cider = training.load_config(configs / "scst_cider.yaml", ["eval.metrics=[coco]"])
    assert _needs(cider, training.steps.reward_clip_model(cider["objective"])) == \
        {"clip": set(), "gpt2": set(), "vlm": set()}
    vlm = training.load_config(configs / "vlm_smile.yaml", ["eval.metrics=[coco]"])
    assert _needs(vlm) == {"clip": set(), "gpt2": set(), "vlm": {"cache/toy_vlm"}}
    lora = training.load_config(configs / "vlm_smile_lora.yaml")  # every metric, and the VLM
    assert _needs(lora) == {"clip": {"cache/toy_clip"}, "gpt2": {"cache/toy_gpt2"}, "vlm": {"cache/toy_vlm"}}


def test_the_toy_vlm_starts_from_the_toy_clip_vision_tower(toy_root):
    from toy_pretrained.vlm import toy_vlm_model, toy_vlm_processor
    from transformers import CLIPModel

    clip_dir = ensure_toy_clip(toy_root.parent / "toy_clip", toy_root, TINY_CLIP)
    processor = toy_vlm_processor(clip_dir, ["a", "red", "circle"], 64)
    model = toy_vlm_model(clip_dir, processor.tokenizer, TINY_VLM).eval()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = torch.randn(2, 3, TINY_CLIP.image_size, TINY_CLIP.image_size)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state
        tower = model.get_submodule("model.vision_tower")
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, expected)
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(model.config.image_token_index) == "<image>"
    assert tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id) == "<end_of_turn>"


def test_toy_vlm_is_a_stock_folder_that_captions_as_its_generate(toy_root, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models import Captioner

    folder = ensure_toy_vlm(toy_root.parent / "toy_vlm", toy_root, TINY_VLM, TINY_CLIP)
    report = json.loads((folder / "manifest.json").read_text())["report"]
    assert report["steps"] == 2 * (40 // 8) and report["val_images"] == 2
    assert 0 <= report["val_colour_shape_right"] <= 100 and report["val_greedy_length"] > 0
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.model_type == "llava"
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        add_generation_prompt=True)
    assert prompt == "user <image> Describe this image. <end_of_turn> assistant"
    ids = processor.tokenizer(prompt, add_special_tokens=False).input_ids
    assert processor.tokenizer.unk_token_id not in ids
    image_path = toy_root / json.loads((toy_root / "toy_test.json").read_text())[0]["image"]
    # At the tiny CLIP's own size, so that both paths hand the processor the same pixels.
    size = TINY_CLIP.image_size
    image = Image.open(image_path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        # At least 3 new tokens on both sides: the tiny model may otherwise end at once, an empty caption.
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=3, do_sample=False, num_beams=1)
    expected = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    captioner = Captioner.from_pretrained(folder, device="cpu")
    caption = captioner.caption(image, num_beams=1, max_length=8, min_length=3)
    assert caption == expected.strip() and caption
    # Cached: a second call builds nothing.
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_toy_vlm(folder, toy_root, TINY_VLM, TINY_CLIP) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
