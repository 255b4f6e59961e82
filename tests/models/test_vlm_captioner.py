"""``model.family: vlm`` on tiny random LLaVA, Idefics3 (SmolVLM), Qwen2-VL and GIT folders built offline
(tests/models/tiny_vlms.py): a training step with MLE and SMILE, generation, export, loading and resume; MLE's loss
equals the model's own ``labels=`` loss, greedy and beam captions equal stock ``generate``, SMILE's gradient equals
the dense full-softmax-subset definition; only caption tokens are scored; BLIP folders stay BLIP's."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import training
from models import CAPTIONER_FAMILIES, Captioner, CaptionObjective, VlmCaptioner
from models.objectives import IGNORE_INDEX, caption_loss, first_target_positions
from tests.models.test_objectives import naive_smile
from tests.models.tiny_vlms import ARCHITECTURES, CAPTIONS, IMAGE_SIZE, TRANSFORMERS_5, tiny_vlm_folder
from training import checkpoints

PROMPT = "describe this image ."  # in the tiny vocabulary
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, architecture: str, tied: bool = False, **model) -> dict:
    section = {"family": "vlm", "pretrained": str(tiny_vlm_folder(architecture, tied)), "max_text_length": 12,
               "vlm": {"prompt": PROMPT}, **model}
    config_file = tmp_path / f"{architecture}.yaml"
    config_file.write_text(yaml.safe_dump({"model": section, "train": {"lr": 1.0e-3}}))
    return training.load_config(config_file)


def _build(tmp_path, architecture: str, tied: bool = False, **model) -> tuple[VlmCaptioner, dict]:
    config = _config(tmp_path, architecture, tied, **model)
    torch.manual_seed(0)
    return training.build_captioner(config, torch.device("cpu")), config


def _images(count: int = 2, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    arrays = torch.randint(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(array.numpy()) for array in arrays]


def _pixels(captioner, images) -> torch.Tensor:
    return torch.stack([captioner.eval_transform()(image) for image in images])


def _stock_inputs(folder, images, text: str | list[str]):
    """What the stock processor makes of PIL images and the prompt text(s), as a user of transformers would."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    texts = [text] * len(images) if isinstance(text, str) else text
    inputs = processor(images=[[image] for image in images], text=texts, return_tensors="pt", padding=True)
    inputs.pop("token_type_ids", None)
    return processor, inputs


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_trains_with_mle_and_smile_generates_exports_loads_and_resumes(architecture, tmp_path):
    captioner, config = _build(tmp_path, architecture)
    assert captioner.image_size == IMAGE_SIZE  # the size the image processor works at (crop, tile, patch grid)
    pixels = _pixels(captioner, _images())
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    targets = captioner.build_targets(input_ids, attention_mask)
    optimizer = training.build_optimizer(captioner, config)
    captioner.train()
    for spec in ({"mle": {"label_smoothing": 0.0}}, "smile", {"mle": 0.1, "smile": 0.9}):
        before = [p.detach().clone() for p in captioner.parameters()]
        optimizer.zero_grad()
        loss, parts = caption_loss(captioner, CaptionObjective(spec), pixels, input_ids, attention_mask, targets)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(torch.isfinite(value) for value in parts.values())
        assert any(not torch.equal(a, b) for a, b in zip(before, captioner.parameters()))

    captioner.eval()
    options = dict(num_beams=2, max_length=6, min_length=1)
    captions = captioner.generate(pixels, **options)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    assert len(captioner.generate(pixels, num_beams=2, max_length=6, num_return_sequences=2)) == 4
    assert len(captioner.generate(pixels, sample=True, max_length=6, num_return_sequences=3)) == 6

    # Export: a stock transformers folder, which Captioner reads back with the same captions.
    from transformers import AutoModelForImageTextToText

    exported = captioner.export_directory(tmp_path / "export")
    stock = AutoModelForImageTextToText.from_pretrained(exported)
    for key, value in captioner.model.state_dict().items():
        torch.testing.assert_close(stock.state_dict()[key], value, rtol=0, atol=0)
    assert json.loads((exported / "vlm_captioner.json").read_text())["prompt"] == PROMPT
    api = Captioner.from_pretrained(exported, device="cpu")
    assert type(api.model) is VlmCaptioner and api.model.prompt == PROMPT
    assert api.caption(_images(), **options) == captions

    # Resume: a training checkpoint restores weights and optimizer; the next step is the same as without a stop.
    path = tmp_path / "checkpoint_latest.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, optimizer, config, checkpoints.TrainProgress())
    resumed, _ = _build(tmp_path, architecture)
    resumed_optimizer = training.build_optimizer(resumed, config)
    checkpoints.load_training_checkpoint(path, resumed.model, resumed_optimizer)
    for model, opt in ((captioner, optimizer), (resumed, resumed_optimizer)):
        model.train()
        torch.manual_seed(1)  # the same dropout masks (GIT has dropout; the checkpoint's RNG state is not used here)
        opt.zero_grad()
        loss, _ = caption_loss(model, CaptionObjective("smile"), pixels, input_ids, attention_mask, targets)
        loss.backward()
        opt.step()
    for a, b in zip(captioner.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = Captioner.from_pretrained(path, device="cpu")  # the weights saved (before that step)
    assert type(loaded.model) is VlmCaptioner and loaded.caption(_images(), **options) == captions


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_mle_equals_the_models_own_labels_loss(architecture, tmp_path):
    """The stock model on the processor's tokens of ``prompt + answer + end``, prompt masked, gives the same loss."""
    captioner, _ = _build(tmp_path, architecture)
    captioner.eval()
    images = _images()
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    targets = captioner.build_targets(input_ids, attention_mask)
    mle = CaptionObjective({"mle": {"label_smoothing": 0.0}})
    with torch.no_grad():
        ours, _ = caption_loss(captioner, mle, _pixels(captioner, images), input_ids, attention_mask, targets)

    texts = [captioner.prompt_text + captioner.separator + text + " " + captioner.end_token for text in CAPTIONS]
    _, inputs = _stock_inputs(tiny_vlm_folder(architecture), images, texts)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, : captioner.prompt_length] = IGNORE_INDEX
    with torch.no_grad():
        outputs = captioner.model(**inputs, labels=labels)
    reference = outputs.loss
    if architecture == "git" and not TRANSFORMERS_5:
        # transformers 4.x's GIT shifts its labels twice (labels[:, 1:], then again in loss_function), so its
        # labels= loss is not the next-token loss (fixed in 5.x): take that loss from its own logits instead.
        text_logits = outputs.logits[:, -labels.shape[1] :]
        reference = torch.nn.functional.cross_entropy(text_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                      ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # The same tokens were scored: the caption's, then the end token.
    scored = [row[row != IGNORE_INDEX].tolist() for row in labels]
    assert scored == [row[row != IGNORE_INDEX].tolist() for row in targets]


@pytest.mark.parametrize("architecture", ARCHITECTURES + ("smolvlm",))
def test_captions_equal_stock_generate_with_the_default_prompt(architecture):
    """``Captioner.from_pretrained(folder)`` on a plain transformers folder: its greedy and beam captions are what
    ``model.generate`` gives for the default prompt on the same image, prompt stripped."""
    folder = tiny_vlm_folder(architecture)
    api = Captioner.from_pretrained(folder, device="cpu")
    assert type(api.model) is VlmCaptioner and api.model.prompt == "Describe this image."
    images = _images(2, seed=1)
    processor, inputs = _stock_inputs(folder, images, api.model.prompt_text)
    if processor.chat_template:
        assert api.model.prompt_text == processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
            add_generation_prompt=True)
    else:  # GIT: the prompt itself, which the processor tokenises
        assert api.model.prompt_text == "Describe this image."
    for num_beams in (1, 2):
        with torch.no_grad():
            generated = api.model.model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=num_beams)
        stock = [text.strip() for text in processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True)]
        assert api.caption(images, num_beams=num_beams, max_length=8, min_length=0) == stock


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_smile_gradient_equals_the_dense_subset_softmax_definition(architecture, tmp_path):
    """SMILE from the head's features (never the (B, T, V) logits) against the dense definition on the model's own
    full logits, in float64: same loss and same gradient for every parameter."""
    captioner, _ = _build(tmp_path, architecture)
    captioner.double().eval()
    images = _images()
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    targets = captioner.build_targets(input_ids, attention_mask)
    loss, _ = caption_loss(captioner, CaptionObjective("smile"), _pixels(captioner, images), input_ids,
                           attention_mask, targets)
    ours = torch.autograd.grad(loss, list(captioner.parameters()), allow_unused=True)

    texts = [captioner.prompt_text + captioner.separator + text + " " + captioner.end_token for text in CAPTIONS]
    _, inputs = _stock_inputs(tiny_vlm_folder(architecture), images, texts)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    logits = captioner.model(**inputs).logits  # (B, [image positions +] P + T, V), every position
    start = logits.shape[1] - inputs["input_ids"].shape[1] + captioner.prompt_length - 1  # GIT: images first
    caption_logits = logits[:, start : start + targets.shape[1]]
    reference = naive_smile(caption_logits, targets)
    expected = torch.autograd.grad(reference, list(captioner.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, reference, atol=1e-10, rtol=1e-10)
    for name, a, b in zip([n for n, _ in captioner.named_parameters()], ours, expected):
        if a is None or b is None:
            assert a is None and b is None or torch.count_nonzero(a if b is None else b) == 0, name
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def test_a_tied_lm_head_is_trained_checkpointed_once_and_exported(tmp_path):
    """SmolVLM-style: the LM head is the word embedding. SMILE's head weight is that one parameter; a training
    checkpoint holds it once (safetensors refuses aliases) and loads back tied; the export is stock-loadable."""
    from transformers import AutoModelForImageTextToText

    captioner, config = _build(tmp_path, "idefics3", tied=True)
    embedding = captioner.model.get_input_embeddings().weight
    assert captioner.model.get_output_embeddings().weight is embedding
    pixels = _pixels(captioner, _images())
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    optimizer = training.build_optimizer(captioner, config)
    loss, _ = caption_loss(captioner, CaptionObjective("smile"), pixels, input_ids, attention_mask,
                           captioner.build_targets(input_ids, attention_mask))
    loss.backward()
    optimizer.step()
    path = tmp_path / "checkpoint_latest.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, optimizer, config, checkpoints.TrainProgress())
    resumed, _ = _build(tmp_path, "idefics3", tied=True)
    checkpoints.load_training_checkpoint(path, resumed.model, training.build_optimizer(resumed, config))
    assert resumed.model.get_output_embeddings().weight is resumed.model.get_input_embeddings().weight
    for a, b in zip(captioner.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stock = AutoModelForImageTextToText.from_pretrained(captioner.export_directory(tmp_path / "export"))
    torch.testing.assert_close(stock.get_output_embeddings().weight, embedding, rtol=0, atol=0)


def test_caption_tokens_are_the_templates_answer_tokens_under_a_byte_level_bpe():
    """SmolVLM's template: the generation prompt ends in "Assistant:" and an answer is rendered "Assistant: text
    <end_of_utterance>". A caption's tokens are those of the rendered answer (its first word with the leading
    space, as the model generates it), then the end-of-turn token."""
    captioner = VlmCaptioner.from_source(str(tiny_vlm_folder("smolvlm")))
    assert captioner.prompt_text.endswith("Assistant:") and captioner.separator == " "
    assert captioner.end_token == "<end_of_utterance>"
    captions = ["A dog on the grass", "a small white cat on a table."]
    input_ids, attention_mask = captioner.tokenize(captions)
    prompt_ids = captioner.tokenizer(captioner.prompt_text, add_special_tokens=False).input_ids
    for ids, mask, caption in zip(input_ids, attention_mask, captions):
        rendered = captioner.processor.apply_chat_template(captioner._conversation(captioner.prompt, caption))
        full = captioner.tokenizer(rendered, add_special_tokens=False).input_ids
        row = ids[mask.bool()].tolist()
        assert full[: len(prompt_ids)] == prompt_ids and full[len(prompt_ids) : len(prompt_ids) + len(row)] == row
        assert captioner.tokenizer.convert_ids_to_tokens(row[0]).startswith("Ġ")  # " A", not "A"
    assert captioner.decode(input_ids) == captions


def test_only_caption_tokens_are_scored_and_the_first_is_the_first_caption_token(tmp_path):
    captioner, _ = _build(tmp_path, "idefics3")
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    targets = captioner.build_targets(input_ids, attention_mask)
    tokenizer = captioner.tokenizer
    for row, caption in zip(targets, CAPTIONS):
        scored = row[row != IGNORE_INDEX].tolist()
        assert scored == tokenizer(caption, add_special_tokens=False).input_ids + [captioner.end_token_id]
    assert captioner.end_token == "<end_of_utterance>"  # the template's end of turn
    assert first_target_positions(targets).tolist() == [0, 0]  # SMILE's first-token rule: the first caption token
    image_tokens = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<fake_token_around_image>")}
    assert not image_tokens & set(targets[targets != IGNORE_INDEX].tolist())
    assert captioner.decode(input_ids) == ["a dog on the grass", "a small white cat on a table."]

    # SCST rollouts come back in tokenize's layout: caption tokens through the end token, padding after it.
    pixels = _pixels(captioner, _images())
    rollouts = captioner.sample_ids(pixels, num_samples=3, max_new_tokens=6)
    mask = captioner.sequence_mask(rollouts)
    assert rollouts.shape[0] == 6 and mask.shape == rollouts.shape
    assert not set(rollouts.flatten().tolist()) & set(captioner.placeholder_ids)  # never an image token
    ended = rollouts == captioner.end_token_id
    after = (ended.long().cumsum(1) - ended.long()) > 0
    assert torch.equal(mask.bool(), ~after)
    with torch.no_grad():
        logits = captioner(pixels, rollouts, mask, image_index=torch.arange(2).repeat_interleave(3))
    assert logits.shape[:2] == rollouts.shape
    greedy = captioner.sample_ids(pixels, num_samples=1, max_new_tokens=6, greedy=True)
    with torch.no_grad():  # the self-critical baseline: stock greedy decoding, image tokens suppressed
        stock = captioner.model.generate(**captioner._model_inputs(pixels), max_new_tokens=6, do_sample=False,
                                         suppress_tokens=captioner.placeholder_ids)
    stock = stock[:, captioner.prompt_length :]
    assert torch.equal(greedy, stock.masked_fill(captioner.sequence_mask(stock) == 0, captioner.pad_token_id))


def test_blip_and_other_folders_are_left_to_their_families(tmp_path):
    assert next(iter(CAPTIONER_FAMILIES)) == "vlm"  # asked first, since blip takes any transformers folder
    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "config.json").write_text(json.dumps({"model_type": "blip"}))
    assert VlmCaptioner.from_exported(str(blip)) is None
    text_only = tmp_path / "gpt2"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert VlmCaptioner.from_exported(str(text_only)) is None
    assert VlmCaptioner.from_exported(str(tmp_path / "missing")) is None
    assert isinstance(VlmCaptioner.from_exported(str(tiny_vlm_folder("llava"))), VlmCaptioner)


def test_config_errors_name_the_key(tmp_path):
    from utils import ConfigError

    config = _config(tmp_path, "llava")
    config["model"]["pretrained"] = None
    with pytest.raises(ConfigError, match="model.pretrained: give a transformers image-text-to-text folder"):
        training.check_inputs(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"family": "vlm", "pretrained": str(tiny_vlm_folder("llava")),
                                             "vlm": {"image_size": 0}}}))
    with pytest.raises(ConfigError, match="model.vlm.image_size must be a positive integer"):
        training.check_inputs(training.load_config(bad))
    with pytest.raises(ValueError, match="model.vlm.end_token 'two words' is 2 tokens"):
        _build(tmp_path, "llava", vlm={"prompt": PROMPT, "end_token": "two words"})


def test_the_toy_vlm_config_builds_the_toy_vlm_on_first_use(tmp_path, monkeypatch):
    """``python train_caption.py --config configs/toy/vlm_smile.yaml`` (shortened to 2 steps on 8 captions and 4
    test images, the toy VLM's recipe made tiny) builds the toy VLM beside the toy set, then trains from it."""
    import functools

    import toy_pretrained
    import train_caption
    from data import ensure_toy_dataset
    from toy_pretrained import ToyClipRecipe, ToyVlmRecipe

    ensure_toy_dataset(tmp_path / "toy", num_train=8, num_val=2, num_test=4, seed=1)
    tiny = ToyVlmRecipe(width=32, layers=1, heads=2, mlp=64, epochs=1, batch_size=8)
    tiny_clip = ToyClipRecipe(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp=64, projection_dim=16,
                              epochs=1, batch_size=8)
    monkeypatch.setitem(toy_pretrained.TOY_BUILDERS, "vlm",
                        functools.partial(toy_pretrained.ensure_toy_vlm, recipe=tiny, clip_recipe=tiny_clip))
    options = [f"output_dir={tmp_path / 'run'}", f"data.toy_root={tmp_path / 'toy'}",
               f"model.pretrained={tmp_path / 'toy_vlm'}", "train.epochs=1", "train.batch_size=20",
               "train.checkpoint_every=0", "train.validate=false", "eval.metrics=[length, toy_grounding]",
               "eval.max_length=6", "eval.num_beams=1"]
    summary = train_caption.main(["--config", str(REPO / "configs" / "toy" / "vlm_smile.yaml"),
                                  *[arg for option in options for arg in ("--opt", option)]])
    assert json.loads((tmp_path / "toy_vlm" / "manifest.json").read_text())["generator"] == "smile-toy-vlm"
    assert (tmp_path / "run" / "checkpoint_best.safetensors").is_file() and summary is not None
    assert "ground_colour_shape" in json.loads((tmp_path / "run" / "test_metrics.json").read_text())


def test_the_toy_vlm_config_trains_and_evaluates_any_folder(tmp_path):
    """``python train_caption.py --config configs/toy/vlm_smile.yaml --opt model.pretrained=DIR`` (shortened to 2
    steps on 8 captions and 4 test images) trains, saves and evaluates; without a model it is one clear error."""
    import train_caption
    from data import ensure_toy_dataset
    from utils import ConfigError

    paths = ensure_toy_dataset(tmp_path / "toy")
    train_file = tmp_path / "train_8.json"
    train_file.write_text(json.dumps(json.loads(paths["train_file"].read_text())[:8]))
    config = REPO / "configs" / "toy" / "vlm_smile.yaml"
    options = [f"output_dir={tmp_path / 'run'}", f"data.toy_root={tmp_path / 'toy'}", f"data.train_files=[{train_file}]",
               "train.epochs=1", "train.batch_size=4", "train.checkpoint_every=0", "eval.max_images=4",
               "eval.metrics=[length]", "eval.max_length=6", "eval.num_beams=1", "train.validate=false"]
    with pytest.raises(ConfigError, match="model.pretrained: give a transformers image-text-to-text folder"):
        train_caption.main(["--config", str(config), *[arg for option in [*options, "model.pretrained=null"]
                                                        for arg in ("--opt", option)]])
    options.append(f"model.pretrained={tiny_vlm_folder('llava')}")
    summary = train_caption.main(["--config", str(config), *[arg for option in options for arg in ("--opt", option)]])
    best = tmp_path / "run" / "checkpoint_best.safetensors"
    assert best.is_file() and summary is not None

    # scripts/export_hf.py on the run's checkpoint: a stock folder that Captioner reads with the run's captions.
    import importlib.util

    from transformers import AutoModelForImageTextToText, AutoProcessor

    spec = importlib.util.spec_from_file_location("export_hf", REPO / "scripts" / "export_hf.py")
    export_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_hf)
    exported = export_hf.export(best, tmp_path / "export")
    AutoModelForImageTextToText.from_pretrained(exported), AutoProcessor.from_pretrained(exported)
    options = dict(num_beams=2, max_length=6)
    from_checkpoint = Captioner.from_pretrained(best, device="cpu").caption(_images(), **options)
    assert Captioner.from_pretrained(exported, device="cpu").caption(_images(), **options) == from_checkpoint


class _LengthReward:
    """A stand-in reward mixture: a caption's reward is its number of words (non-zero advantages)."""

    components = [("cider_d", 1.0, None)]
    context = None

    def __call__(self, captions, image_index, images=None, keys=None):
        value = torch.tensor([float(len(text.split())) for text in captions])
        return value, {"cider_d": value}


def _step_gradients(captioner, step, pixels, captions, micro_batch_size):
    from training import steps

    captioner.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss, _, _, finite = steps.accumulate_gradients(captioner, captioner, step, pixels, captions,
                                                    torch.arange(len(captions)), micro_batch_size=micro_batch_size)
    assert finite
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in captioner.parameters()]


@pytest.mark.parametrize("spec", ["smile", {"mle": 0.3, "smile": 0.7}])
def test_micro_batches_give_the_one_batch_gradient(spec, tmp_path):
    from training import steps

    captioner, _ = _build(tmp_path, "qwen2_vl")
    captioner.train()
    captions = ["a dog", "a small white cat on a table .", "a red ball", "the man near the big blue table"]
    pixels = _pixels(captioner, _images(4))
    step = steps.TeacherForcedStep(CaptionObjective(spec))
    whole = _step_gradients(captioner, step, pixels, captions, None)
    split = _step_gradients(captioner, step, pixels, captions, 3)  # 3 + 1 captions of different lengths
    torch.testing.assert_close(split[0], whole[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(split[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_scst_with_smile_trains_through_generate_and_the_same_forward(tmp_path):
    from training import steps

    captioner, _ = _build(tmp_path, "idefics3")
    scst, token_spec = steps.split_objective({"scst": {"samples": 2, "max_tokens": 5, "baseline": "greedy"},
                                              "smile": 0.5})
    step = steps.ScstStep(scst, CaptionObjective(token_spec), _LengthReward())
    loss, grads = _step_gradients(captioner.train(), step, _pixels(captioner, _images()), CAPTIONS, None)
    assert torch.isfinite(loss) and any(bool(grad.abs().sum() > 0) for grad in grads)


def _loss_and_gradients(captioner, spec, pixels, input_ids, attention_mask):
    captioner.zero_grad(set_to_none=True)
    targets = captioner.build_targets(input_ids, attention_mask)
    loss, _ = caption_loss(captioner, CaptionObjective(spec), pixels, input_ids, attention_mask, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in captioner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", ["smile", {"mle": 0.5, "smile": 0.5}])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(spec, tmp_path):
    """``model.gradient_checkpointing: true`` recomputes each decoder layer in the backward (its MLP runs twice per
    step) and changes neither the loss nor any gradient, through the features path (SMILE) and the logits path."""
    results = []
    for checkpointing in (False, True):
        captioner, _ = _build(tmp_path, "llava", gradient_checkpointing=checkpointing)
        captioner.train()
        mlp = captioner._backbone().language_model.layers[0].mlp
        calls, forward = [], mlp.forward

        def counted(*args, _forward=forward, _calls=calls, **kwargs):  # not a hook: transformers 5 keeps hooks out of the recompute
            _calls.append(1)
            return _forward(*args, **kwargs)

        mlp.forward = counted
        pixels = _pixels(captioner, _images())
        input_ids, attention_mask = captioner.tokenize(CAPTIONS)
        results.append(_loss_and_gradients(captioner, spec, pixels, input_ids, attention_mask))
        assert len(calls) == (2 if checkpointing else 1)
    (plain_loss, plain), (checkpointed_loss, checkpointed) = results
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert checkpointed.keys() == plain.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_weight_dtype_is_validated_and_float32_without_cuda(tmp_path):
    from utils import ConfigError

    bad = tmp_path / "bad_dtype.yaml"
    bad.write_text(yaml.safe_dump({"model": {"family": "vlm", "pretrained": str(tiny_vlm_folder("llava")),
                                             "vlm": {"dtype": "float16"}}}))
    with pytest.raises(ConfigError, match=r"model.vlm.dtype must be one of \['float32', 'bfloat16'\], got 'float16'"):
        training.check_inputs(training.load_config(bad))
    if not torch.cuda.is_available():  # bfloat16 applies on CUDA only: a CPU run keeps exact float32 weights
        captioner, _ = _build(tmp_path, "llava", vlm={"prompt": PROMPT, "dtype": "bfloat16"})
        assert {p.dtype for p in captioner.parameters()} == {torch.float32}


def test_a_cpu_run_on_a_cuda_host_trains_float32_weights(tmp_path, monkeypatch):
    """model.vlm.dtype: bfloat16 loads bf16 weights where CUDA exists; a run on the CPU there (device: cpu) still
    trains float32 ones (training.build_captioner), LoRA adapters included."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    captioner, _ = _build(tmp_path, "llava", vlm={"prompt": PROMPT, "dtype": "bfloat16"}, lora={"r": 4})
    assert {p.dtype for p in captioner.parameters()} == {torch.float32}
    assert any(p.requires_grad for p in captioner.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model.vlm.dtype: bfloat16 applies on CUDA only")
def test_bfloat16_weights_on_cuda_train_and_generate(tmp_path):
    config = _config(tmp_path, "qwen2_vl", vlm={"prompt": PROMPT, "dtype": "bfloat16"})
    captioner = training.build_captioner(config, torch.device("cuda"))
    assert {p.dtype for p in captioner.parameters() if p.is_floating_point()} == {torch.bfloat16}
    pixels = _pixels(captioner, _images()).cuda()
    captioner.train()
    for spec in ("smile", "mle"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = _loss_and_gradients(captioner, spec, pixels, *captioner.tokenize(CAPTIONS))
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    captioner.eval()
    assert len(captioner.generate(pixels, num_beams=2, max_length=6)) == 2
