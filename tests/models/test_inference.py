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
