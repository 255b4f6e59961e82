"""The prefix-LM captioner against outputs of the ORIGINAL ClipCap code (tests/fixtures/clipcap_original/README.md),
plus its captioner interface: targets, SMILE from features, frozen parts, batched generation and saving."""
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import IGNORE_INDEX, CaptionObjective, CheckpointError
from models.objectives import caption_loss
from models.prefix_captioner import (
    PrefixCaptioner,
    clipcap_original_loss,
    load_clipcap_checkpoint,
)

CLIPCAP = Path(__file__).parents[1] / "fixtures" / "clipcap_original"
KINDS = ("mlp", "transformer")
LAYOUTS = ("", "_tf411_layout")
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=512)


@pytest.fixture(scope="module")
def clipcap_fixture():
    return torch.load(CLIPCAP / "clipcap_fixture.pt", weights_only=True)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """The fixture's tiny GPT-2 as a transformers directory: config.json, vocab.json, merges.txt (no weights)."""
    directory = tmp_path_factory.mktemp("gpt2")
    shutil.copy(CLIPCAP / "gpt2_config.json", directory / "config.json")
    shutil.copy(CLIPCAP / "gpt2_vocab.json", directory / "vocab.json")
    shutil.copy(CLIPCAP / "gpt2_merges.txt", directory / "merges.txt")
    return directory


def _load(kind, layout, gpt2_dir, fixture, **options):
    config = fixture[kind]["config"]
    return load_clipcap_checkpoint(
        CLIPCAP / f"clipcap_{kind}_weights{layout}.pt", gpt2=gpt2_dir, mapping_type=kind,
        prefix_length=config["prefix_length"], clip_length=config["clip_length"],
        num_layers=config["mapper_num_layers"] or 8, prefix_size=config["prefix_size"], **options,
    ).eval()


@pytest.fixture(scope="module")
def loaded(gpt2_dir, clipcap_fixture):
    return {(kind, layout): _load(kind, layout, gpt2_dir, clipcap_fixture) for kind in KINDS for layout in LAYOUTS}


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_loss_match_original(loaded, clipcap_fixture, kind, layout):
    captioner, case = loaded[kind, layout], clipcap_fixture[kind]
    with torch.no_grad():
        embeds = captioner.model.project(case["prefix_input"])
        logits = captioner.prefix_logits(case["prefix_input"], case["tokens"], case["mask"])
    torch.testing.assert_close(embeds, case["prefix_embeds"], atol=1e-5, rtol=0)
    assert logits.shape == case["logits"].shape
    inside = case["mask"].bool()
    assert (logits - case["logits"])[inside].abs().max() <= 1e-4
    assert (logits - case["logits"]).abs().max() <= 1e-4  # padded queries too (README: they matched as well)
    loss = clipcap_original_loss(logits, case["tokens"], case["config"]["prefix_length"])
    assert abs(loss.item() - case["loss"].item()) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_both_layouts_load_the_same_weights(loaded, kind):
    """The transformers 4.1x file differs only by the legacy buffers, so generation is checked on one layout."""
    modern, legacy = loaded[kind, ""].model.state_dict(), loaded[kind, "_tf411_layout"].model.state_dict()
    assert modern.keys() == legacy.keys() and all(torch.equal(modern[k], legacy[k]) for k in modern)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_matches_original(loaded, clipcap_fixture, kind):
    captioner, case = loaded[kind, "_tf411_layout"], clipcap_fixture[kind]
    beam, greedy = case["beam_settings"], case["greedy_settings"]
    beams = captioner.generate_from_prefix(case["prefix_input"], method="beam", beam_size=beam["beam_size"],
                                           max_tokens=beam["entry_length"], stop_token=beam["stop_token"],
                                           original_semantics=True)
    greedy_ids = captioner.generate_from_prefix(case["prefix_input"], method="greedy",
                                                max_tokens=greedy["entry_length"], stop_token=greedy["stop_token"],
                                                original_semantics=True)
    assert beams == case["beam_ids"]
    assert greedy_ids == case["greedy_ids"]
    assert [captioner.decode(row) for row in beams] == case["beam_texts"]
    assert captioner.decode(greedy_ids) == case["greedy_texts"]


def test_fixture_covers_the_stopped_beam_and_length_paths(clipcap_fixture):
    """Guards the fixture itself: beams of different lengths, and a caption cut at entry_length without '.'."""
    rows = [row for kind in KINDS for row in clipcap_fixture[kind]["beam_ids"]]
    assert any(len({len(b) for b in row}) > 1 for row in rows)  # a beam stopped while others went on
    assert all(any(row[0][-1] != 13 and len(row[0]) == 12 for row in clipcap_fixture[kind]["beam_ids"])
               for kind in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generate_equals_original_greedy(loaded, clipcap_fixture, kind):
    """transformers' batched greedy (KV cache, one batch) gives ClipCap's per-image generate2 ids here."""
    captioner, case = loaded[kind, ""], clipcap_fixture[kind]
    batched = captioner.generate_from_prefix(case["prefix_input"], method="greedy", max_tokens=12,
                                             original_semantics=False)
    assert batched == case["greedy_ids"]
    beams = captioner.generate_from_prefix(case["prefix_input"], method="beam", beam_size=3, max_tokens=12,
                                           original_semantics=False)
    assert [len(row) for row in beams] == [3, 3, 3]


def test_original_loss_ignores_bang_but_targets_do_not(loaded, clipcap_fixture):
    """Id 0 is ClipCap's padding and GPT-2's '!': the original loss drops real '!' tokens, build_targets keeps them."""
    captioner = loaded["mlp", ""]
    ids, mask = captioner.tokenize(["A cat!"])
    assert 0 in ids[0].tolist()
    targets = captioner.build_targets(ids, mask)
    assert (targets == 0).any()
    logits = torch.randn(1, captioner.prefix_length + ids.shape[1], 453)
    tokens = ids * mask
    with_bang = clipcap_original_loss(logits, tokens, captioner.prefix_length)
    shifted = logits[:, captioner.prefix_length - 1 : -1].reshape(-1, 453)
    keep = tokens.flatten() != 0
    torch.testing.assert_close(with_bang, F.cross_entropy(shifted[keep], tokens.flatten()[keep]))


# ---------------------------------------------------------------------------------------------- loading


def test_loader_drops_exactly_the_legacy_buffers(gpt2_dir, tmp_path, clipcap_fixture):
    state = torch.load(CLIPCAP / "clipcap_mlp_weights_tf411_layout.pt", weights_only=True)
    legacy = [k for k in state if k.endswith((".attn.bias", ".attn.masked_bias"))]
    assert len(legacy) == 4
    cases = {
        "unexpected": {**state, "gpt.transformer.h.0.attn.masked_bias_extra": torch.zeros(())},
        "other_buffer": {**state, "gpt.transformer.h.0.mlp.bias": torch.zeros(3)},
        "missing": {k: v for k, v in state.items() if k != "clip_project.model.2.bias"},
        "extra_layer": {**state, "gpt.transformer.h.2.attn.c_attn.bias": torch.zeros(96)},
    }
    names = {"unexpected": "gpt.transformer.h.0.attn.masked_bias_extra", "other_buffer": "gpt.transformer.h.0.mlp.bias",
             "missing": "clip_project.model.2.bias", "extra_layer": "gpt.transformer.h.2.attn.c_attn.bias"}
    for case, broken in cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=names[case].replace(".", r"\.")):
            load_clipcap_checkpoint(path, gpt2=gpt2_dir, mapping_type="mlp")


def test_loader_rejects_a_wrong_configuration(gpt2_dir):
    with pytest.raises(CheckpointError, match="clip_project"):
        load_clipcap_checkpoint(CLIPCAP / "clipcap_transformer_weights.pt", gpt2=gpt2_dir, mapping_type="mlp")
    with pytest.raises(CheckpointError, match="layers.2"):  # the checkpoint has 2 mapper layers, not 3
        load_clipcap_checkpoint(CLIPCAP / "clipcap_transformer_weights.pt", gpt2=gpt2_dir,
                                mapping_type="transformer", clip_length=10, num_layers=3)
    with pytest.raises(CheckpointError, match="shape"):
        load_clipcap_checkpoint(CLIPCAP / "clipcap_mlp_weights.pt", gpt2=gpt2_dir, mapping_type="mlp",
                                prefix_length=5)


def test_transformer_clip_length_is_read_from_the_checkpoint(gpt2_dir, clipcap_fixture):
    captioner = load_clipcap_checkpoint(CLIPCAP / "clipcap_transformer_weights.pt", gpt2=gpt2_dir,
                                        mapping_type="transformer", num_layers=2)
    assert captioner.config.clip_length == 10 and captioner.config.normalize_prefix


# ---------------------------------------------------------------------------------------------- the captioner


@pytest.fixture(scope="module")
def image_captioner(gpt2_dir, clipcap_fixture):
    """The fitted MLP fixture model with a tiny random CLIP tower (projection 512), in eval mode."""
    torch.manual_seed(0)
    return _load("mlp", "", gpt2_dir, clipcap_fixture, clip=TINY_CLIP)


def _pixels(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tokenize_and_targets(image_captioner):
    captioner = PrefixCaptioner(image_captioner.model, image_captioner.tokenizer, max_text_length=6, append_eos=True)
    ids, mask = captioner.tokenize(["A small white cat on a wooden table.", "A cat!"])
    eos = captioner.tokenizer.eos_token_id
    plain = captioner.tokenizer.encode("A cat!")
    assert ids.shape == (2, 6) and ids[0, -1] == eos  # truncated, EOS kept
    assert ids[1, : len(plain) + 1].tolist() == plain + [eos] and mask[1].sum() == len(plain) + 1
    targets = captioner.build_targets(ids, mask)
    assert (targets[1, len(plain) + 1 :] == IGNORE_INDEX).all() and (targets[mask.bool()] == ids[mask.bool()]).all()
    # Bucketed padding: the next multiple of 8 (capped at max_text_length); the real tokens are unchanged.
    bucketed = PrefixCaptioner(image_captioner.model, image_captioner.tokenizer, max_text_length=20,
                               append_eos=True, text_padding="bucket")
    ids, mask = bucketed.tokenize(["A cat!"])
    assert ids.shape == (1, 8) and ids[0, : len(plain) + 1].tolist() == plain + [eos] and mask.sum() == len(plain) + 1


def test_forward_is_aligned_with_targets(image_captioner):
    captioner = image_captioner
    pixels = _pixels()
    ids, mask = captioner.tokenize(["A bowl of fruit.", "Two horses running across a dusty field.", "A cat!"])
    with torch.no_grad():
        logits = captioner(pixels, ids, mask)
        prefix = captioner.model.image_prefix(pixels)
        full_mask = torch.cat([torch.ones(3, captioner.prefix_length, dtype=mask.dtype), mask], dim=1)
        full = captioner.prefix_logits(prefix, ids, full_mask)
    assert logits.shape == (3, ids.shape[1], 453)
    torch.testing.assert_close(logits, full[:, captioner.prefix_length - 1 : -1])
    targets = captioner.build_targets(ids, mask)
    plain_mle = CaptionObjective({"mle": {"label_smoothing": 0}})
    loss, _ = caption_loss(captioner, plain_mle, pixels, ids, mask, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100))


def _naive_smile(logits, targets):
    """SMILE by its definition: softmax over the row's own caption tokens, the first position over everything."""
    losses = []
    for row_logits, row in zip(logits, targets):
        tokens = row[row != IGNORE_INDEX].unique()
        first = int((row != IGNORE_INDEX).nonzero()[0])
        for t, label in enumerate(row.tolist()):
            if label == IGNORE_INDEX:
                continue
            support = torch.arange(logits.shape[-1]) if t == first else tokens
            losses.append(torch.logsumexp(row_logits[t, support], 0) - row_logits[t, label])
    return torch.stack(losses).mean()


def test_smile_from_features_equals_the_naive_formula(image_captioner):
    captioner = image_captioner
    pixels = _pixels(seed=1)
    ids, mask = captioner.tokenize(["A small white cat on a white table.", "Two horses!", "A black bear."])
    targets = captioner.build_targets(ids, mask)
    objective = CaptionObjective("smile")
    assert objective.supports_features
    head = captioner.model.clip_project.model[2].weight
    loss, _ = caption_loss(captioner, objective, pixels, ids, mask, targets)
    (grad,) = torch.autograd.grad(loss, head)
    reference = _naive_smile(captioner(pixels, ids, mask), targets)
    (reference_grad,) = torch.autograd.grad(reference, head)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, reference_grad, atol=1e-6, rtol=1e-4)


def test_generate_from_pixels_batched_equals_original(image_captioner):
    captioner = image_captioner
    pixels = _pixels(batch=4, seed=2)
    batched = captioner.generate_ids(pixels, num_beams=1, max_length=12)
    captioner.original_generation = True
    try:
        original = captioner.generate_ids(pixels, num_beams=1, max_length=12)
        original_beam = captioner.generate(pixels, num_beams=3, max_length=12)
    finally:
        captioner.original_generation = False
    assert captioner.decode(batched) == captioner.decode(original)
    assert len(original_beam) == 4 and all(isinstance(text, str) for text in original_beam)
    assert len(captioner.generate(pixels, num_beams=3, max_length=12)) == 4


def test_frozen_parts_and_token_prefixes(gpt2_dir):
    gpt = dict(vocab_size=453, n_positions=128, n_embd=32, n_layer=1, n_head=2)
    for mapping, extra in (("mlp", {}), ("transformer", {"prefix_length": 4, "num_layers": 1})):
        captioner = PrefixCaptioner.build(gpt2=gpt, clip={**TINY_CLIP, "projection_dim": 24}, tokenizer=gpt2_dir,
                                          prefix={"mapping_type": mapping, "prefix_source": "tokens",
                                                  "only_prefix": True, **extra})
        expected = 16 if mapping == "mlp" else 4  # (32 / 8)^2 patches for the token-wise MLP
        assert captioner.prefix_length == expected and captioner.config.prefix_size == 32
        captioner.train()
        assert not captioner.model.gpt.training and not captioner.model.vision.training
        assert captioner.model.clip_project.training
        trainable = {name.split(".")[0] for name, p in captioner.model.named_parameters() if p.requires_grad}
        assert trainable == {"clip_project"}
        ids, mask = captioner.tokenize(["A cat.", "A dog on a mat."])
        loss, _ = caption_loss(captioner, CaptionObjective("mle"), _pixels(2), ids, mask,
                               captioner.build_targets(ids, mask))
        loss.backward()
        assert captioner.model.vision.vision_model.embeddings.patch_embedding.weight.grad is None
    one_stage = PrefixCaptioner.build(gpt2=gpt, clip={**TINY_CLIP, "projection_dim": 24}, tokenizer=gpt2_dir,
                                      prefix={"train_vision": True})
    ids, mask = one_stage.tokenize(["A cat."])
    one_stage(_pixels(1), ids, mask).sum().backward()
    assert one_stage.model.vision.visual_projection.weight.grad is not None
    with pytest.raises(ValueError, match="prefix_length must be 16"):
        PrefixCaptioner.build(gpt2=gpt, clip=TINY_CLIP, tokenizer=gpt2_dir,
                              prefix={"prefix_source": "tokens", "prefix_length": 10})


def test_save_directory_round_trip(image_captioner, tmp_path):
    captioner = image_captioner
    captioner.save_directory(tmp_path / "clipcap")
    loaded = PrefixCaptioner.from_directory(tmp_path / "clipcap").eval()
    ids, mask = captioner.tokenize(["A cat on a mat."])
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels(1), ids, mask), captioner(_pixels(1), ids, mask))
    assert loaded.append_eos == captioner.append_eos and loaded.config == captioner.config


def test_convert_script_writes_a_loadable_directory(gpt2_dir, clipcap_fixture, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  Path(__file__).parents[2] / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(CLIPCAP / "clipcap_transformer_weights_tf411_layout.pt"), str(tmp_path / "out"),
                 "--clipcap-gpt2", str(gpt2_dir), "--mapping-type", "transformer", "--num-layers", "2"])
    captioner = PrefixCaptioner.from_directory(tmp_path / "out").eval()
    case = clipcap_fixture["transformer"]
    with torch.no_grad():
        logits = captioner.prefix_logits(case["prefix_input"], case["tokens"], case["mask"])
    assert (logits - case["logits"]).abs().max() <= 1e-4
    assert captioner.generate_from_prefix(case["prefix_input"], method="greedy", max_tokens=12) == case["greedy_ids"]


def test_a_prefix_config_builds_through_the_engine(gpt2_dir, tmp_path):
    import yaml

    import training

    gpt = dict(vocab_size=453, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    config_file = tmp_path / "prefix.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"family": "prefix", "max_text_length": 20, "prefix": {
        "gpt2": gpt, "clip": {**TINY_CLIP, "projection_dim": 24}, "tokenizer": str(gpt2_dir),
        "mapping_type": "transformer", "prefix_length": 4, "clip_length": 2, "num_layers": 1, "only_prefix": True}}}))
    config = training.load_config(config_file)
    captioner = training.build_captioner(config, torch.device("cpu"))
    assert isinstance(captioner, PrefixCaptioner) and captioner.image_size == 32
    assert captioner.config.clip_length == 2 and captioner.config.prefix_size == 24 and captioner.config.only_prefix
    ids, mask = captioner.tokenize(["A cat.", "Two dogs!"])
    loss, parts = caption_loss(captioner, CaptionObjective({"mle": 0.1, "smile": 0.9}), _pixels(2), ids, mask,
                               captioner.build_targets(ids, mask))
    assert torch.isfinite(loss) and set(parts) == {"mle", "smile"}
    captioner.eval()
    assert len(captioner.generate(_pixels(2), **training.generation_options(config))) == 2
    with pytest.raises(Exception, match="model.family"):
        training.load_config(config_file, ["model.family=clipcap"])
