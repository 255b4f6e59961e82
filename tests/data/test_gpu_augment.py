"""Tests for data/gpu_augment.py: the device path against the PIL path it replaces (data/transforms.py).

CPU tensors only (the same code runs on CUDA); tiny images written under tmp_path. Differences are measured in
8-bit levels (0..255) after undoing the normalisation. Tolerances and why:

* crop box, flip and RandAugment draws: identical (same torch calls; timm's draws replayed), and torch's
  generator ends in the same state;
* one RandAugment op on the same input: identical (max 0): the LUT ops build PIL's tables, the warps use PIL's
  sampling centre, inside test, edge clamp and truncation in float64;
* whole pipeline: CPU JPEG decode is libjpeg-turbo in both (identical); the bicubic resize rounds like PIL between
  its passes but uses float rather than PIL's fixed-point weights, so about 1e-4 of the values are one level off
  (mean < 0.002 levels, max 1). With RandAugment, Equalize's table spreads neighbouring levels apart, so a value
  the resize put one level off can come out a few levels off: max 4 (3 seen), more than one level off in < 1e-3
  of the values.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp
from torch.utils.data import DataLoader

import data.transforms as cpu_transforms
from data import gpu_augment
from data.datasets import CaptionTrainDataset, ImageLoadError, caption_collate
from data.gpu_augment import (
    NOT_APPLIED,
    OPS,
    EncodedImageBatch,
    EncodedImageTransform,
    apply_op,
    build_device_pipeline,
    decode_and_augment,
    draw_randaugment,
    encoded_collate,
)
from data.transforms import _BLIP_TIMM_HPARAMS, BlipRandAugment, build_train_transform
from imaging import CLIP_MEAN, CLIP_STD, open_rgb

SIZE = 48
MEAN = torch.tensor(CLIP_MEAN).view(-1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(-1, 3, 1, 1)


def photo(seed: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a smooth colour field plus noise, like a photo to JPEG and to the resize."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype(np.uint8)


def assert_close_to_pil(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The RandAugment tolerance for one image or batch (module docstring), in 8-bit levels; returns the
    differences. One shifted Equalize table entry moves every pixel at that level (~1/256 of an image)."""
    difference = (levels(out) - levels(reference)).abs()
    assert difference.max() < 4 + 1e-3, difference.max()
    assert (difference > 1 + 1e-3).float().mean() < 1e-2 and difference.mean() < 2e-2, difference.mean()
    return difference.flatten()


def levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, H, W) or (3, H, W) back to 0..255."""
    return (normalised * STD.view(normalised.shape[-3], 1, 1) + MEAN.view(normalised.shape[-3], 1, 1)) * 255


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    """One file per kind the datasets meet: RGB and greyscale JPEG, CMYK JPEG, RGB, RGBA, palette, 16-bit PNG."""
    root = tmp_path_factory.mktemp("images")
    pixels = photo(0, 97, 75)
    files = {
        "jpeg": ("img_1.jpg", Image.fromarray(pixels), {"quality": 90}),
        "jpeg_grey": ("img_2.jpg", Image.fromarray(pixels).convert("L"), {"quality": 90}),
        "jpeg_cmyk": ("img_3.jpg", Image.fromarray(pixels).convert("CMYK"), {"quality": 90}),
        "png": ("img_4.png", Image.fromarray(photo(1, 64, 80)), {}),
        "png_rgba": ("img_5.png", Image.fromarray(np.dstack([pixels, pixels[..., :1]])), {}),
        "png_palette": ("img_6.png", Image.fromarray(pixels).quantize(64), {}),
        "png_16bit": ("img_7.png", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257 + 3), {}),
    }
    paths = {}
    for kind, (name, image, options) in files.items():
        image.save(root / name, **options)
        paths[kind] = root / name
    return paths


def pil_pipeline(path: Path, seed: int, size: int = SIZE, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    return build_train_transform(size, **options)(open_rgb(path))


def device_pipeline(path: Path, seed: int, size: int = SIZE, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    item = EncodedImageTransform(size, **options)(path)
    return decode_and_augment(EncodedImageBatch.from_items([item]), "cpu", size)[0]


# ------------------------------------------------------------------------------------------ draws


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_same_seed_draws_the_pil_pipelines_crop_and_flip(image_files, kind):
    path = image_files[kind]
    image = open_rgb(path)
    crop = cpu_transforms.transforms.RandomResizedCrop(SIZE, scale=(0.5, 1.0))
    transform = EncodedImageTransform(SIZE, randaugment=False)
    flips = set()
    for seed in range(50):
        torch.manual_seed(seed)
        box = crop.get_params(image, crop.scale, crop.ratio)
        flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip's draw
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        draw = transform(path).draw
        assert (draw.top, draw.left, draw.height, draw.width) == tuple(box)
        assert draw.flip == flip
        assert torch.equal(torch.get_rng_state(), state)
        flips.add(flip)
    assert flips == {True, False}


def test_worker_consumes_torch_rng_like_the_pil_transform(image_files):
    """The whole transform, RandAugment included: the next draw after either is the same, so everything a worker
    draws later (the next image's crop) agrees too."""
    for seed in range(10):
        torch.manual_seed(seed)
        build_train_transform(SIZE)(open_rgb(image_files["png"]))
        after_pil = torch.get_rng_state()
        torch.manual_seed(seed)
        EncodedImageTransform(SIZE)(image_files["png"])
        assert torch.equal(torch.get_rng_state(), after_pil)


def test_randaugment_draws_are_the_ops_timm_applies(monkeypatch):
    """From the same torch state, the ops (and signs) timm applies in BlipRandAugment are the ones drawn here."""
    applied: list[tuple[str, tuple]] = []

    def recording(name, function):
        def record(image, *arguments, **options):
            applied.append((name, arguments))
            return function(image, *arguments, **options)
        return record

    monkeypatch.setattr(cpu_transforms.IdentityOp, "__call__",
                        lambda self, image: applied.append(("Identity", ())) or image)
    augment = BlipRandAugment()
    for op in augment.rand_augment.ops:
        if isinstance(op, AugmentOp):
            op.aug_fn = recording(op.name, op.aug_fn)
    arguments = gpu_augment.op_arguments()
    image = Image.fromarray(photo(2, 16, 16))
    seen = set()
    for seed in range(400):
        applied.clear()
        torch.manual_seed(seed)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        augment(image)
        assert random.getstate() == python_state  # BlipRandAugment restores the global generators ...
        assert np.array_equal(np.random.get_state()[1], numpy_state[1])
        torch.manual_seed(seed)
        ops, signs = draw_randaugment(int(torch.randint(0, 2**32, ()).item()))
        assert random.getstate() == python_state  # ... and the replay never touches them
        expected = []
        for op, sign in zip(ops, signs):
            if op == NOT_APPLIED:
                continue
            name = OPS[op]
            argument = () if name in ("Identity", "AutoContrast", "Equalize") else (sign * arguments[name],)
            expected.append((name, argument))
            seen.add((name, sign))
        assert applied == expected, seed
    assert {name for name, _ in seen} == set(OPS)
    assert {("Rotate", 1), ("Rotate", -1)} <= seen


def test_randaugment_draw_distribution():
    """Per slot: each op drawn with probability 1/10 and applied with 1/2 (Identity always), signs 50/50.
    A chi-square over (10 ops applied, skipped) against BLIP's probabilities, at a fixed seed."""
    draws = 20000
    generator = torch.Generator().manual_seed(1234)
    seeds = torch.randint(0, 2**32, (draws,), generator=generator).tolist()
    counts = np.zeros((2, len(OPS) + 1))
    signed = negative = 0
    for seed in seeds:
        ops, signs = draw_randaugment(seed)
        for slot, (op, sign) in enumerate(zip(ops, signs)):
            counts[slot, op] += 1  # NOT_APPLIED (-1) lands in the last column
            if op != NOT_APPLIED and OPS[op] in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
                signed += 1
                negative += sign < 0
    expected = np.array([0.1 if name == "Identity" else 0.05 for name in OPS] + [0.45]) * draws
    for slot in range(2):
        chi_square = ((counts[slot] - expected) ** 2 / expected).sum()
        assert chi_square < 29.6, (slot, counts[slot])  # 10 degrees of freedom, p = 0.001
        wrong = np.array([0.1] * len(OPS) + [0.0]) * draws  # e.g. every op always applied
        assert (((counts[slot] - wrong) ** 2) / np.maximum(wrong, 1)).sum() > 1000
    assert abs(negative / signed - 0.5) < 4 * 0.5 / np.sqrt(signed)


# ------------------------------------------------------------------------------------------ pixels


def timm_op(name: str, sign: int, image: Image.Image, monkeypatch) -> Image.Image:
    """timm's op at magnitude 5 with BLIP's hyper-parameters, applied for sure, with the given sign."""
    if name == "Identity":
        return image
    op = AugmentOp(name, prob=1.0, magnitude=5, hparams=_BLIP_TIMM_HPARAMS)
    with monkeypatch.context() as patch:  # timm negates when random.random() > 0.5
        patch.setattr(random, "random", lambda: 1.0 if sign < 0 else 0.0)
        return op(image)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("sign", [1, -1])
def test_each_op_matches_timm_exactly(name, sign, monkeypatch):
    pictures = [photo(3, 40, 40), (60 + photo(4, 40, 40) // 3).astype(np.uint8), photo(5, 37, 37)]
    for pixels in pictures:
        reference = np.asarray(timm_op(name, sign, Image.fromarray(pixels), monkeypatch), dtype=np.float32)
        images = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0)
        out = apply_op(images, name, [sign])[0].permute(1, 2, 0).numpy()
        assert np.abs(out - reference).max() == 0, name


@pytest.mark.parametrize("factor", [0.3, 0.55, 1.45, 1.9])
def test_brightness_and_sharpness_match_pil_at_other_factors(factor):
    """At magnitude 5 both factors are 1.0 (no change); the formulas still hold elsewhere."""
    from PIL import ImageEnhance

    pixels = photo(6, 33, 29)
    images = torch.from_numpy(pixels).permute(2, 0, 1).float().unsqueeze(0)
    for enhance, ours in ((ImageEnhance.Brightness, gpu_augment.brightness),
                          (ImageEnhance.Sharpness, gpu_augment.sharpness)):
        reference = np.asarray(enhance(Image.fromarray(pixels)).enhance(factor), dtype=np.float32)
        assert np.abs(ours(images, factor)[0].permute(1, 2, 0).numpy() - reference).max() == 0


def test_lookup_table_ops_match_pil_on_odd_histograms():
    """Equalize/autocontrast on a batch: one level, two levels, a narrow range, a skewed histogram."""
    from PIL import ImageOps

    rng = np.random.default_rng(7)
    pictures = [np.full((20, 20, 3), 77, np.uint8), rng.choice([10, 200], (20, 20, 3)).astype(np.uint8),
                rng.integers(100, 104, (20, 20, 3), dtype=np.uint8),
                (rng.exponential(20, (20, 20, 3)).clip(0, 255)).astype(np.uint8), photo(8, 20, 20)]
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float()
    for operation, ours in ((ImageOps.equalize, gpu_augment.equalize), (ImageOps.autocontrast,
                                                                          gpu_augment.autocontrast)):
        out = ours(images.clone()).permute(0, 2, 3, 1).numpy()
        for index, pixels in enumerate(pictures):
            assert np.array_equal(out[index], np.asarray(operation(Image.fromarray(pixels)), dtype=np.float32))


@pytest.mark.parametrize("kind", ["jpeg", "png", "jpeg_grey", "jpeg_cmyk", "png_rgba", "png_palette", "png_16bit"])
def test_pipeline_without_randaugment_matches_pil(image_files, kind):
    differences = []
    for seed in range(8):
        reference = pil_pipeline(image_files[kind], seed, randaugment=False)
        out = device_pipeline(image_files[kind], seed, randaugment=False)
        assert out.shape == reference.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
        differences.append((levels(out) - levels(reference)).abs())
    difference = torch.stack(differences)
    assert difference.max() < 1 + 1e-3 and difference.mean() < 2e-3, (difference.max(), difference.mean())


def test_pipeline_with_randaugment_matches_pil(image_files):
    """The ops drawn per image are the PIL path's, so the outputs agree; at 384 px (BLIP's size) too."""
    differences = []
    for size, seeds in ((SIZE, range(60)), (384, range(3))):
        for seed in seeds:
            differences.append(assert_close_to_pil(device_pipeline(image_files["jpeg"], seed, size),
                                                   pil_pipeline(image_files["jpeg"], seed, size)))
    difference = torch.cat(differences)
    assert (difference > 1 + 1e-3).float().mean() < 1e-3 and difference.mean() < 2e-3, difference.mean()


# ------------------------------------------------------------------------------------------ loader


@pytest.fixture()
def train_set(tmp_path):
    """Six JPEGs and two PNGs of different sizes, two captions each, under one annotation file."""
    entries = []
    for index in range(8):
        pixels = photo(10 + index, 50 + 7 * index, 60 - 3 * index)
        name = f"img_{index}.jpg" if index < 6 else f"img_{index}.png"
        Image.fromarray(pixels).save(tmp_path / name, **({"quality": 90} if index < 6 else {}))
        entries.append({"image": name, "caption": [f"picture {index}", f"image {index}"]})
    annotation = tmp_path / "train.json"
    annotation.write_text(__import__("json").dumps(entries))
    return annotation, tmp_path


def loader(dataset, collate, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate, num_workers=workers,
                      generator=torch.Generator().manual_seed(0), drop_last=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_batches_match_the_pil_loader(train_set, workers):
    """Through CaptionTrainDataset and a DataLoader (its per-worker seeding included), batch for batch."""
    annotation, root = train_set
    pipeline = build_device_pipeline(SIZE, randaugment=True, horizontal_flip=True)
    pil_loader = loader(CaptionTrainDataset(annotation, root, build_train_transform(SIZE)), caption_collate, workers)
    device_loader = loader(CaptionTrainDataset(annotation, root, pipeline.worker_transform), pipeline.collate,
                           workers)
    # One after the other from the same global seed: with 0 workers both loaders draw from the main process's
    # generator (with workers, from per-worker seeds the loader's generator fixes).
    torch.manual_seed(0)
    pil_batches = list(pil_loader)
    torch.manual_seed(0)
    device_batches = list(device_loader)
    batches = 0
    for (reference, captions, ids, skipped), (encoded, our_captions, our_ids, our_skipped) in zip(pil_batches,
                                                                                                 device_batches):
        assert isinstance(encoded, EncodedImageBatch) and len(encoded) == 4
        assert (captions, skipped) == (our_captions, our_skipped) and torch.equal(ids, our_ids)
        images = encoded.to(torch.device("cpu"))
        assert images.shape == reference.shape
        assert_close_to_pil(images, reference)
        batches += 1
    assert batches == 4


def test_pin_memory_reaches_the_payloads(train_set, monkeypatch):
    """The DataLoader's pinning calls the batch's pin_memory, which pins every payload (faked without CUDA)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    annotation, root = train_set
    dataset = CaptionTrainDataset(annotation, root, EncodedImageTransform(SIZE))
    batch = encoded_collate([dataset[0], dataset[13]])
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: self.clone())
    pinned_batch = pin_memory(batch)
    images = pinned_batch[0]
    assert isinstance(images, EncodedImageBatch) and images.is_jpeg == [True, False]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(images.data, batch[0].data))
    assert torch.equal(images.crops, batch[0].crops)


def test_payloads_jpeg_bytes_or_pixels(image_files):
    transform = EncodedImageTransform(SIZE)
    for kind, is_jpeg in (("jpeg", True), ("jpeg_grey", True), ("jpeg_cmyk", False), ("png", False)):
        item = transform(image_files[kind])
        assert item.is_jpeg == is_jpeg and item.data.dtype == torch.uint8
        if is_jpeg:
            assert bytes(item.data.numpy()) == image_files[kind].read_bytes()
        else:
            assert item.data.shape == (3, *item.size)
    restored = pickle.loads(pickle.dumps(transform))
    assert repr(restored) == repr(transform) and restored.reads_files


def test_unreadable_files_follow_the_skip_rule(train_set):
    annotation, root = train_set
    (root / "img_3.jpg").write_bytes(b"not an image")
    (root / "img_7.png").unlink()
    failing = CaptionTrainDataset(annotation, root, EncodedImageTransform(SIZE))
    with pytest.raises(ImageLoadError, match="img_3.jpg.*cannot decode"):
        failing[6]
    with pytest.raises(ImageLoadError, match="img_7.png.*not found"):
        failing[14]
    skipping = CaptionTrainDataset(annotation, root, EncodedImageTransform(SIZE), skip_bad_images=True)
    images, captions, ids, skipped = encoded_collate([skipping[index] for index in (0, 6, 14, 15)])
    assert (len(images), captions, ids.tolist(), skipped) == (1, ["picture 0"], [0], 3)
    everything_skipped = encoded_collate([skipping[6], skipping[7]])
    assert len(everything_skipped[0]) == 0 and everything_skipped[3] == 2
    assert decode_and_augment(everything_skipped[0], "cpu", SIZE).shape == (0, 3, SIZE, SIZE)


def test_truncated_jpeg_fails_in_the_worker_as_in_the_pil_path(train_set):
    """No end marker: PIL decodes it in the worker, so the skip rule applies as before."""
    annotation, root = train_set
    raw = (root / "img_1.jpg").read_bytes()
    (root / "img_1.jpg").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageLoadError, match="img_1.jpg"):
        CaptionTrainDataset(annotation, root, EncodedImageTransform(SIZE))[2]
    skipping = CaptionTrainDataset(annotation, root, EncodedImageTransform(SIZE), skip_bad_images=True)
    assert skipping[2][0] is None


def test_device_decode_failure_names_the_file(train_set):
    """A JPEG whose header reads (PIL does not parse the Huffman tables to open it) but whose Huffman table is
    garbage: the batched decode fails, and the one-by-one retry names the file."""
    annotation, root = train_set
    transform = EncodedImageTransform(SIZE)
    good = transform(root / "img_0.jpg")
    raw = bytearray((root / "img_1.jpg").read_bytes())
    table = raw.find(b"\xff\xc4")  # DHT marker; its 16 code-length counts follow the length and class bytes
    raw[table + 5:table + 21] = b"\xff" * 16
    (root / "img_1.jpg").write_bytes(bytes(raw))
    bad = transform(root / "img_1.jpg")
    assert bad.is_jpeg
    with pytest.raises(ImageLoadError, match="img_1.jpg"):
        decode_and_augment(EncodedImageBatch.from_items([good, bad]), "cpu", SIZE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_matches_pil(image_files):
    """nvJPEG decodes with its own IDCT and chroma upsampling: a level or two, rarely more."""
    for kind in ("jpeg", "png", "jpeg_grey"):
        for seed in range(8):
            reference = pil_pipeline(image_files[kind], seed)
            torch.manual_seed(seed)
            item = EncodedImageTransform(SIZE)(image_files[kind])
            out = decode_and_augment(EncodedImageBatch.from_items([item]).pin_memory(), "cuda", SIZE)[0].cpu()
            difference = (levels(out) - levels(reference)).abs()
            assert difference.mean() < 1.0 and difference.max() <= 8, (kind, difference.mean(), difference.max())


# ------------------------------------------------------------------------------------------ training


def test_engine_loader_with_augment_on_device_gives_the_pil_loaders_batches(train_set, tmp_path):
    """``data.augment_on: device`` through training.build_train_loader: the batches arrive encoded, and the training
    loop's ``images.to(device)`` turns them into the workers path's images (same seed, same order, same draws)."""
    import training
    from models import BlipCaptioner
    from tests.conftest import FIXTURES

    annotation, root = train_set
    captioner = BlipCaptioner.build("tiny", image_size=SIZE, tokenizer=FIXTURES / "vocab.txt")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"output_dir: {tmp_path / 'run'}\n")
    common = [f"data.train_files=[{annotation}]", f"data.image_root={root}", "data.num_workers=0",
              "train.batch_size=4", "data.min_scale=0.5"]
    batches = {}
    for where in ("workers", "device"):
        config = training.load_config(config_file, [*common, f"data.augment_on={where}"])
        loader, position, _ = training.build_train_loader(config, captioner)
        position.set_epoch(0)
        torch.manual_seed(0)
        batches[where] = list(loader)
    assert len(batches["device"]) == len(batches["workers"]) == 4
    for (reference, captions, ids, _), (encoded, our_captions, our_ids, _) in zip(batches["workers"],
                                                                                  batches["device"]):
        assert isinstance(encoded, EncodedImageBatch) and captions == our_captions and torch.equal(ids, our_ids)
        assert_close_to_pil(encoded.to(torch.device("cpu"), non_blocking=True), reference)
