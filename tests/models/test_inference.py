"""The Python API: ``Captioner.from_pretrained(source).caption(images)`` equals the evaluation pipeline."""
import pytest
import torch
from PIL import Image

from training import checkpoints
import training
from models import BlipCaptioner, Captioner, CheckpointError
from models.checkpoint import save_transformers_directory
from imaging import eval_transform
from tests.conftest import FIXTURES

REPO = FIXTURES.parents[1]


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    """A randomly initialised toy-config captioner saved as a training checkpoint, and its resolved config."""
    root = tmp_path_factory.mktemp("inference")
    options = [f"data.toy_root={root / 'toy'}", "data.num_workers=0", "eval.max_images=6", "eval.batch_size=4"]
    config = training.resolve_data_paths(training.load_config(REPO / "configs" / "toy" / "pretrain.yaml", options))
    torch.manual_seed(3)
    captioner = training.build_captioner(config, torch.device("cpu"), pretrained=None, load_weights=False)
    path = root / "checkpoint_best.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, None, config, checkpoints.TrainProgress())
    return path, config, captioner


def test_training_checkpoint_captions_equal_eval_caption(toy_checkpoint):
    path, config, captioner = toy_checkpoint
    loader, _ = training.build_eval_loader(config, "val", captioner.eval_transform())
    expected = [row["caption"] for row in training.generate_captions(captioner, loader, config, torch.device("cpu"))]
    api = Captioner.from_pretrained(path, device="cpu")
    assert api.generation["max_length"] == config["eval"]["max_length"]  # decoding from the checkpoint's config
    dataset = loader.dataset.dataset  # a Subset: eval.max_images
    paths = [dataset.image_root / name for name in dataset.image_paths[:6]]
    assert api.caption(paths, batch_size=4) == expected and len(expected) == 6
    assert api.caption(paths[0]) == expected[0]  # one image in, one str out
    assert api.caption([Image.open(p) for p in paths[:2]]) == expected[:2]  # PIL images as well as paths


def test_batch_size_does_not_change_captions(toy_checkpoint):
    path, config, _ = toy_checkpoint
    api = Captioner.from_pretrained(path, device="cpu")
    images = [Image.new("RGB", (40 + 7 * i, 30), (30 * i, 200 - 20 * i, 90)) for i in range(5)]
    assert api.caption(images, batch_size=2) == api.caption(images, batch_size=5)


def test_transformers_directory_loads_with_its_prompt(tmp_path):
    torch.manual_seed(1)
    model = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt", prompt="a photo of ").eval()
    save_transformers_directory(model, tmp_path / "hf")
    api = Captioner.from_pretrained(tmp_path / "hf", device="cpu")
    assert api.model.prompt == "a photo of " and api.image_size == 32
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    pixel_values = eval_transform(32)(image).unsqueeze(0)
    options = dict(num_beams=2, max_length=12, min_length=3)
    assert api.caption(image, **options) == model.generate(pixel_values, **options)[0]


def test_bad_input_is_named(toy_checkpoint, tmp_path):
    path, _, _ = toy_checkpoint
    api = Captioner.from_pretrained(path, device="cpu")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png"):
        api.caption(not_an_image)
    with pytest.raises(ValueError, match="image not found: .*missing.jpg"):
        api.caption(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="max_length 500 exceeds this model's 64 text positions"):
        api.caption(Image.new("RGB", (8, 8)), max_length=500)
    with pytest.raises(TypeError, match="num_beam"):
        api.caption(Image.new("RGB", (8, 8)), num_beam=2)
    with pytest.raises(CheckpointError, match="no such file"):
        Captioner.from_pretrained(tmp_path / "nowhere" / "checkpoint.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="nor an export that a model family .* reads"):
        Captioner.from_pretrained(tmp_path / "empty")


def test_moved_checkpoint_asks_for_its_tokenizer(toy_checkpoint, tmp_path):
    _, config, captioner = toy_checkpoint
    moved = dict(config, model=dict(config["model"], tokenizer="/elsewhere/toy/vocab.txt"))
    path = tmp_path / "moved.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, None, moved, checkpoints.TrainProgress())
    with pytest.raises(CheckpointError, match="tokenizer="):
        Captioner.from_pretrained(path, device="cpu")
    api = Captioner.from_pretrained(path, device="cpu", tokenizer=config["model"]["tokenizer"])
    assert api.caption(Image.new("RGB", (8, 8))) == Captioner.from_pretrained(
        toy_checkpoint[0], device="cpu").caption(Image.new("RGB", (8, 8)))


# Candidates and n-gram bans ------------------------------------------------------------------------------------

TINY_GPT2 = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 453}
TINY_CLIP_TOWER = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 16}


def _images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 7 * i, 30), (30 * i, 200 - 20 * i, 90)) for i in range(count)]


def test_candidates_are_the_best_beams_or_samples(toy_checkpoint):
    path, _, _ = toy_checkpoint
    api = Captioner.from_pretrained(path, device="cpu")
    images = _images(3)
    options = dict(num_beams=3, max_length=12, min_length=3)
    candidates = api.caption_candidates(images, 3, batch_size=2, **options)
    assert len(candidates) == 3 and all(len(row) == 3 for row in candidates)
    assert [row[0] for row in candidates] == api.caption(images, **options)  # the best beam is caption's
    pixels = api.preprocess(images)
    flat = api.model.generate(pixels, **api.generation_settings(**options), num_return_sequences=3)
    assert candidates == [flat[k : k + 3] for k in range(0, 9, 3)]  # image-major, best first
    assert api.caption_candidates(pixels, 3, **options) == candidates  # a preprocessed batch as well as images
    assert api.caption_candidates(images[0], 2, **options) == [candidates[0][:2]]  # one image: one list
    # More candidates than beams widen the beam search to N: its best beam is caption's at num_beams=N.
    wide = api.caption_candidates(images, 5, **options)
    assert [row[0] for row in wide] == api.caption(images, **{**options, "num_beams": 5})
    torch.manual_seed(0)
    samples = api.caption_candidates(images, 4, sample=True, max_length=12)
    torch.manual_seed(0)
    assert api.caption_candidates(images, 4, sample=True, max_length=12) == samples  # seeded: repeatable
    assert all(len(row) == 4 for row in samples) and any(len(set(row)) > 1 for row in samples)
    with pytest.raises(ValueError, match="num_candidates must be an integer >= 1, got 0"):
        api.caption_candidates(images, 0)
    with pytest.raises(TypeError, match="num_return_sequences"):  # caption gives one caption per image
        api.caption(images, num_return_sequences=2)


@pytest.fixture(scope="module")
def looping_captioners(tmp_path_factory):
    """A tiny BLIP and a tiny prefix LM whose LM heads get a fixed bias (a forward hook) so strong that their
    captions are one word repeated: the loop ``no_repeat_ngram_size`` exists to break."""
    import shutil

    from models import PrefixCaptioner

    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    for name, target in (("gpt2_vocab.json", "vocab.json"), ("gpt2_merges.txt", "merges.txt")):
        shutil.copy(FIXTURES / "clipcap_original" / name, folder / target)
    torch.manual_seed(0)
    blip = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt", prompt="a picture of ").eval()
    prefix = PrefixCaptioner.build(TINY_GPT2, TINY_CLIP_TOWER, tokenizer=folder, prefix={"prefix_length": 2},
                                   max_text_length=20).eval()
    heads = ((blip, blip.model.text_decoder.cls, blip.model.text_decoder.cls.predictions.decoder.out_features),
             (prefix, prefix.model.gpt.lm_head, prefix.model.gpt.lm_head.out_features))
    for captioner, head, vocabulary in heads:
        words = [20, 21, 22]  # plain word pieces of both vocabularies: no special, end or stop token
        assert not set(words) & (set(captioner.tokenizer.all_special_ids) | {getattr(captioner, "stop_token_id", 0)})
        bias = torch.zeros(vocabulary)
        bias[words] = torch.tensor([30.0, 29.0, 28.0])
        head.register_forward_hook(lambda module, inputs, output, bias=bias: output + bias)
    return {"blip": blip, "prefix": prefix}


def _repeated_ngrams(row: list[int], n: int) -> list[tuple[int, ...]]:
    grams = [tuple(row[k : k + n]) for k in range(len(row) - n + 1)]
    return [gram for gram in set(grams) if grams.count(gram) > 1]


@pytest.mark.parametrize("family", ["blip", "prefix"])
def test_no_repeat_ngram_size_breaks_repetition_loops(looping_captioners, family):
    captioner = looping_captioners[family]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    end = {captioner.tokenizer.pad_token_id, captioner.tokenizer.eos_token_id, captioner.tokenizer.sep_token_id}

    def rows(ids):  # each row up to its end; BLIP's rows start with bos + prompt, which the ban counts too
        return [[token for token in row if token not in end] for row in ids.tolist()]

    options = dict(max_length=16, min_length=16)
    looping = rows(captioner.generate_ids(pixels, num_beams=1, **options))
    assert all(_repeated_ngrams(row, 2) for row in looping)  # without the ban: a loop
    for n in (2, 3):
        for decoding in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2), dict(sample=True)):
            torch.manual_seed(0)
            banned = rows(captioner.generate_ids(pixels, no_repeat_ngram_size=n, **options, **decoding))
            assert all(len(row) > 8 and not _repeated_ngrams(row, n) for row in banned), (n, decoding, banned)
    api = Captioner(captioner, device="cpu")
    image = Image.new("RGB", (32, 32), (20, 120, 200))
    expected = captioner.generate(api.preprocess([image]), **api.generation_settings(no_repeat_ngram_size=2))
    assert api.caption(image, no_repeat_ngram_size=2) == expected[0] != api.caption(image)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        api.caption(image, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="num_return_sequences 4 exceeds num_beams 3"):
        captioner.generate_ids(pixels, num_beams=3, num_return_sequences=4)


def test_clipcap_generation_refuses_what_it_cannot_do(looping_captioners):
    prefix = looping_captioners["prefix"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prefix.original_generation = True
    try:
        with pytest.raises(ValueError, match="original_generation .* has no no_repeat_ngram_size; got 2"):
            prefix.generate_ids(pixels, no_repeat_ngram_size=2)
        beams = prefix.generate_ids(pixels, num_beams=3, max_length=6, num_return_sequences=2)
        best = prefix.generate_ids(pixels, num_beams=3, max_length=6)
        assert beams.shape[0] == 4 and prefix.decode(beams)[::2] == prefix.decode(best)
    finally:
        prefix.original_generation = False


def test_evaluation_and_the_api_share_generation_names_and_defaults(toy_checkpoint, tmp_path):
    import yaml

    from models.inference import DEFAULT_GENERATION

    evaluation = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["eval"]
    assert DEFAULT_GENERATION == {key: evaluation[key] for key in DEFAULT_GENERATION}
    _, config, captioner = toy_checkpoint
    assert set(training.generation_options(config)) == set(DEFAULT_GENERATION)
    banned = dict(config, eval=dict(config["eval"], no_repeat_ngram_size=2))
    path = tmp_path / "banned.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, None, banned, checkpoints.TrainProgress())
    assert Captioner.from_pretrained(path, device="cpu").generation["no_repeat_ngram_size"] == 2
