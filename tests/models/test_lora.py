"""LoRA through peft (models/lora.py, ``model.lora``) on every registered family: the optimiser sees only the
adapters (+ projector), checkpoints hold only them, saving / loading / merging give the same logits, resume is
exact, SMILE and MLE train through the adapters, and ``--opt model.lora.r=8`` trains and exports end to end."""
import json
import sys

import pytest
import torch
import yaml
from torch import nn

import train_caption  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from models import CAPTIONER_FAMILIES, Captioner, CaptionObjective, lora  # noqa: E402
from models.checkpoint import load_checkpoint_file, save_checkpoint_file  # noqa: E402
from models.objectives import caption_loss  # noqa: E402
from tests.models.test_families import CAPTIONS, gpt2_tokenizer, tiny_model_section  # noqa: E402, F401
from tests.test_cli import _tiny_config, toy  # noqa: E402, F401
from training import checkpoints  # noqa: E402

# Every registered family; the VLM family as three architectures (decoder-only with image tokens and a
# multi_modal_projector, Idefics3's connector, Qwen2-VL's visual.merger and its own position scheme).
VLM_ARCHITECTURES = ("llava", "idefics3", "qwen2_vl")
FAMILIES = [case for family in sorted(CAPTIONER_FAMILIES) for case in
            ([f"vlm:{arch}" for arch in VLM_ARCHITECTURES] if family == "vlm" else [family])]


def _section(case, gpt2_tokenizer):  # noqa: F811
    if case.startswith("vlm:"):
        from tests.models.tiny_vlms import IMAGE_SIZE, tiny_vlm_folder

        return {"family": "vlm", "pretrained": str(tiny_vlm_folder(case.split(":")[1])), "max_text_length": 12,
                "vlm": {"image_size": IMAGE_SIZE}}
    return tiny_model_section(case, gpt2_tokenizer)


@pytest.fixture(scope="module")
def bases(gpt2_tokenizer, tmp_path_factory):  # noqa: F811
    """case -> (its tiny ``model`` section, a checkpoint of its random weights: the "pre-trained" base)."""
    folder = tmp_path_factory.mktemp("lora_bases")
    found = {}
    for family in FAMILIES:
        section = _section(family, gpt2_tokenizer)
        config = _load(folder, family.replace(":", "_"), section)
        torch.manual_seed(0)
        captioner = training.build_captioner(config, torch.device("cpu"))
        path = folder / f"{family.replace(':', '_')}_base.safetensors"
        save_checkpoint_file(path, captioner.model.state_dict(), {}, {"config": config})
        found[family] = (section, path)
    return found


def _load(folder, name, section, overrides=()):
    config_file = folder / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump({"model": section, "train": {"lr": 1e-2, "weight_decay": 0.0}}))
    return training.load_config(config_file, list(overrides))


def _lora_run(bases, family, tmp_path, *overrides, seed=1):
    """(captioner with adapters on the base, config): ``model.lora.r=4`` unless ``overrides`` say otherwise."""
    section, base = bases[family]
    config = _load(tmp_path, family.replace(":", "_"), section,
                   [f"model.pretrained={base}", "model.lora.r=4", *overrides])
    torch.manual_seed(seed)
    return training.build_captioner(config, torch.device("cpu")), config


def _randomise_adapters(captioner, seed=3):
    """B = 0 at injection makes a fresh adapter the identity; give it weights so that it matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in captioner.model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def _batch(captioner):
    images = torch.randn(2, 3, captioner.image_size, captioner.image_size, generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    return images, input_ids, attention_mask, captioner.build_targets(input_ids, attention_mask)


def _logits(captioner, batch):
    captioner.eval()
    with torch.no_grad():
        return captioner(*batch[:3])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_optimizer_holds_only_the_adapters(family, bases, tmp_path):
    captioner, config = _lora_run(bases, family, tmp_path)
    optimizer = training.build_optimizer(captioner, config)
    names = {id(p): name for name, p in captioner.model.named_parameters()}
    held = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert held and all(".lora_A." in name or ".lora_B." in name for name in held), held
    targets = captioner.model._smile_lora["targets"]
    assert len(held) == 2 * len(targets)
    # The defaults: BLIP's text decoder blocks, GPT-2's c_attn/c_proj, a VLM language model's attention.
    if family == "blip":
        assert all(".text_decoder.bert.encoder.layer." in f".{name}" for name in targets)
        assert {name.rsplit(".", 1)[-1] for name in targets} == {"query", "key", "value", "dense"}
        assert any(".crossattention." in name for name in targets)
    elif family == "prefix":
        assert all(name.startswith("gpt.transformer.h.") for name in targets)
        assert {name.rsplit(".", 1)[-1] for name in targets} == {"c_attn", "c_proj"}
    else:
        assert {name.rsplit(".", 1)[-1] for name in targets} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert not any(lora._in_vision(name) for name in targets)
    frozen = [p for p in captioner.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) > 10 * sum(p.numel() for group in optimizer.param_groups
                                                     for p in group["params"])


PROJECTORS = {"prefix": "clip_project.", "vlm:llava": "model.multi_modal_projector.",
              "vlm:idefics3": "model.connector.", "vlm:qwen2_vl": "model.visual.merger."}


@pytest.mark.parametrize("family", [case for case in FAMILIES if case in PROJECTORS])
def test_adapter_plus_projector_and_projector_alone_train_the_projector(family, bases, tmp_path):
    projector = PROJECTORS[family]
    captioner, config = _lora_run(bases, family, tmp_path, "model.lora.train=adapter+projector")
    names = {id(p): name for name, p in captioner.model.named_parameters()}
    held = {names[id(p)] for group in training.build_optimizer(captioner, config).param_groups
            for p in group["params"]}
    assert {name for name in held if ".lora_" not in name} == {
        name for name, _ in captioner.model.named_parameters() if name.startswith(projector)}
    captioner, config = _lora_run(bases, family, tmp_path, "model.lora.r=null", "model.lora.train=projector")
    trainable = [name for name, p in captioner.model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(projector) for name in trainable)
    assert set(lora.trainable_state_dict(captioner.model)) - {n for n, _ in captioner.model.named_buffers()} == set(
        trainable)
    assert not hasattr(captioner.model, "peft_config")  # no adapters: nothing of peft in the model


def test_blip_has_no_projector_to_train(bases, tmp_path):
    with pytest.raises(utils.ConfigError, match="no projector"):  # BLIP's decoder cross-attends: no projector
        _lora_run(bases, "blip", tmp_path, "model.lora.train=adapter+projector")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_holds_the_adapters_and_reloads_merges_and_exports_to_the_same_logits(family, bases, tmp_path):
    captioner, config = _lora_run(bases, family, tmp_path)
    batch = _batch(captioner)
    base = _logits(captioner, batch)  # B = 0: a fresh adapter leaves the base's logits
    _randomise_adapters(captioner)
    adapted = _logits(captioner, batch)
    assert (adapted - base).abs().max() > 1e-2
    path = tmp_path / "checkpoint_best.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, None, config, checkpoints.TrainProgress())

    # The checkpoint: the adapters and buffers only, a small fraction of the full base's file.
    state, _, _ = load_checkpoint_file(path)
    trainable = {name for name, p in captioner.model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in captioner.model.named_buffers()}
    assert set(state) - buffers == trainable and all(".lora_" in key for key in set(state) - buffers)
    assert not any(".base_layer." in key for key in state)
    assert path.stat().st_size < 0.25 * bases[family][1].stat().st_size

    # Loading it rebuilds base + adapters: the same logits exactly, through training and through the API.
    rebuilt = training.build_captioner(config, torch.device("cpu"), pretrained=str(path))
    assert torch.equal(_logits(rebuilt, batch), adapted)
    api = Captioner.from_pretrained(path, device="cpu").model
    assert lora.is_partial(api.model) and torch.equal(_logits(api, batch), adapted)
    # ... and into a captioner built without it, it is a clear error rather than a random base.
    section = {**config["model"], "lora": {**config["model"]["lora"], "r": None}}
    plain = type(captioner).from_config(section)
    with pytest.raises(Exception, match="holds only what its run trained"):
        checkpoints.load_weights(path, plain.model)

    # Merged: the stock model again (no peft layer, no peft attribute), within fp32 rounding of the adapters.
    merged = lora.merged_copy(captioner)
    assert not any("lora" in name or "base_layer" in name for name in merged.state_dict())
    torch.testing.assert_close(_logits(merged, batch), adapted, rtol=1e-5, atol=1e-5)
    assert lora.is_partial(captioner.model)  # the original keeps its adapters
    assert torch.equal(_logits(captioner, batch), adapted)

    # Export writes the merged model, loaded back by the family's reader of stock transformers folders.
    exported = captioner.export_directory(tmp_path / "export")
    weights = [p for p in exported.rglob("*.safetensors")]
    assert weights and not any("lora" in key or "base_layer" in key
                               for file in weights for key in load_checkpoint_file_keys(file))
    loaded = type(captioner).from_exported(str(exported))
    torch.testing.assert_close(_logits(loaded, batch), adapted, rtol=1e-5, atol=1e-5)


def load_checkpoint_file_keys(file):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def test_the_blip_export_loads_in_stock_transformers_without_peft(bases, tmp_path):
    captioner, _ = _lora_run(bases, "blip", tmp_path)
    _randomise_adapters(captioner)
    batch = _batch(captioner)
    exported = captioner.export_directory(tmp_path / "export")
    from transformers import BlipForConditionalGeneration

    stock, info = BlipForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(type(m).__module__.startswith("peft") for m in stock.modules())
    images, input_ids, attention_mask, _ = batch
    stock.eval()
    with torch.no_grad():
        logits = stock(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    torch.testing.assert_close(logits, _logits(captioner, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_from_an_adapter_checkpoint_is_exact(family, bases, tmp_path):
    """2 steps, checkpoint, 2 more steps == rebuild from the checkpoint (base from model.pretrained, new random
    adapters overwritten) and 2 steps: bit-identical parameters, dropout draws included."""
    objective = CaptionObjective("mle")

    def train(captioner, optimizer, steps):
        captioner.train()
        batch = _batch(captioner)
        for _ in range(steps):
            loss, _ = caption_loss(captioner, objective, *batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    captioner, config = _lora_run(bases, family, tmp_path, "model.lora.dropout=0.3")
    optimizer = training.build_optimizer(captioner, config)
    torch.manual_seed(7)
    train(captioner, optimizer, 2)
    path = tmp_path / "checkpoint_latest.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, optimizer, config, checkpoints.TrainProgress())
    train(captioner, optimizer, 2)

    resumed, _ = _lora_run(bases, family, tmp_path, "model.lora.dropout=0.3", seed=99)  # other adapter init
    resumed_optimizer = training.build_optimizer(resumed, config)
    progress, _ = checkpoints.load_training_checkpoint(path, resumed.model, resumed_optimizer)
    checkpoints.restore_rng_from(progress)
    train(resumed, resumed_optimizer, 2)
    expected, got = captioner.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
    assert any(not torch.equal(value, bases_value) for value, bases_value in
               zip(lora.trainable_state_dict(captioner.model).values(),
                   lora.trainable_state_dict(_lora_run(bases, family, tmp_path)[0].model).values()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["mle", "smile", {"mle": 0.3, "smile": 0.7}])
def test_mle_and_smile_train_through_the_adapters_only(family, spec, bases, tmp_path):
    captioner, _ = _lora_run(bases, family, tmp_path)
    _randomise_adapters(captioner)
    captioner.train()
    objective = CaptionObjective(spec)
    batch = _batch(captioner)
    loss, _ = caption_loss(captioner, objective, *batch)
    loss.backward()
    for name, param in captioner.model.named_parameters():
        if ".lora_" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    assert any(param.grad.abs().sum() > 0 for name, param in captioner.model.named_parameters()
               if ".lora_B." in name)
    # SMILE's feature path (HeadFeatures) and its logits path agree under the adapters.
    captioner.eval()
    with torch.no_grad():
        head, _ = caption_loss(captioner, objective, *batch)
        expected, _ = objective(captioner(*batch[:3]), batch[3])
    torch.testing.assert_close(head, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scst_rollouts_and_generation_run_through_the_adapters(family, bases, tmp_path):
    captioner, _ = _lora_run(bases, family, tmp_path)
    _randomise_adapters(captioner)
    captioner.eval()
    images = _batch(captioner)[0]
    rollouts = captioner.sample_ids(images, num_samples=2, max_new_tokens=4)
    assert rollouts.shape[0] == 4 and captioner.sequence_mask(rollouts).shape == rollouts.shape
    greedy = captioner.generate(images, num_beams=1, max_length=12, min_length=1)
    assert len(greedy) == 2 and greedy == lora.merged_copy(captioner).generate(images, num_beams=1, max_length=12,
                                                                               min_length=1)


class _Unknown(nn.Module):
    """A captioner-like object whose ``.model`` matches no default LoRA target rule."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential()
        self.model.add_module("encoder_in", nn.Linear(4, 8))
        self.model.add_module("block", nn.Sequential(nn.Linear(8, 8), nn.GELU()))
        self.model.add_module("head_out", nn.Linear(8, 4))


def test_an_unknown_architecture_names_its_linear_layers():
    section = {"pretrained": "base.safetensors", "lora": {"r": 4}}
    with pytest.raises(utils.ConfigError, match=r"target_modules.*\['block.0', 'encoder_in', 'head_out'\]"):
        lora.apply_lora(_Unknown(), section)
    with pytest.raises(utils.ConfigError, match=r"matches no layer.*\['block.0', 'encoder_in', 'head_out'\]"):
        lora.apply_lora(_Unknown(), {**section, "lora": {"r": 4, "target_modules": ["q_proj"]}})
    given = _Unknown()
    assert lora.apply_lora(given, {**section, "lora": {"r": 4, "target_modules": ["encoder_in", "head_out"]}}) == [
        "encoder_in", "head_out"]
    assert [name for name, p in given.model.named_parameters() if p.requires_grad] == [
        "encoder_in.lora_A.default.weight", "encoder_in.lora_B.default.weight",
        "head_out.lora_A.default.weight", "head_out.lora_B.default.weight"]


@pytest.mark.parametrize("lora_section, message", [
    ({"r": 4}, "set model.pretrained"),
    ({"r": 4, "train": "full"}, "trains no adapter"),
    ({"train": "adapter"}, "needs adapters"),
    ({"r": -1}, "model.lora.r must be"),
    ({"r": 4, "alpha": 0}, "model.lora.alpha must be"),
    ({"r": 4, "target_modules": []}, "model.lora.target_modules must be"),
    ({"r": 4, "train": "everything"}, "model.lora.train must be one of"),
])
def test_bad_lora_sections_are_one_config_error(lora_section, message):
    with pytest.raises(utils.ConfigError, match=message):
        lora.check_config({"pretrained": None, "lora": lora_section})


def test_without_peft_a_lora_section_is_one_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(utils.ConfigError, match="pip install -r requirements.txt"):
        lora.check_config({"pretrained": "base.safetensors", "lora": {"r": 8}})
    lora.check_config({"pretrained": None, "lora": {"r": None}})  # LoRA off needs no peft


def test_the_lm_head_is_never_adapted(bases, tmp_path):
    with pytest.raises(utils.ConfigError, match="LM head"):
        _lora_run(bases, "prefix", tmp_path, "model.lora.target_modules=[lm_head, c_attn]")


def test_train_caption_with_lora_r8_trains_resumes_exactly_evaluates_and_exports(toy, tmp_path):  # noqa: F811
    """The toy flow with ``--opt model.lora.r=8``: a 2-step base run, then LoRA + SMILE from it. One epoch, then a
    resumed second epoch, equals two uninterrupted epochs bit for bit; the best checkpoint holds the adapters only,
    is scored on test, loads in ``Captioner`` and exports merged."""
    base_run = tmp_path / "base"
    train_caption.main(["--config", str(_tiny_config(toy, tmp_path, base_run))])
    base = base_run / checkpoints.BEST
    lora_options = ["--opt", "model.lora.r=8", "--opt", f"model.pretrained={base}", "--opt", "objective=smile",
                    "--opt", "train.schedule=constant"]

    reference = tmp_path / "reference"
    train_caption.main(["--config", str(_tiny_config(toy, tmp_path, reference, **{"train.epochs": 2})),
                        *lora_options])
    interrupted = tmp_path / "interrupted"
    train_caption.main(["--config", str(_tiny_config(toy, tmp_path, interrupted)), *lora_options])
    summary = train_caption.main(["--config", str(_tiny_config(toy, tmp_path, interrupted, name="again",
                                                               **{"train.epochs": 2})),
                                  *lora_options, "--resume", "--opt", "train.test_after_training=true"])
    assert summary["steps"] == 4 and summary["test"]["num_images"] == 4
    expected, expected_tensors, _ = load_checkpoint_file(reference / checkpoints.LATEST)
    got, got_tensors, _ = load_checkpoint_file(interrupted / checkpoints.LATEST)
    assert expected.keys() == got.keys() and all(".lora_" in key for key in got)
    assert [key for key in expected if not torch.equal(expected[key], got[key])] == []
    optimizer_keys = [key for key in expected_tensors if key.startswith("optimizer/")]
    assert optimizer_keys and all(torch.equal(expected_tensors[k], got_tensors[k]) for k in optimizer_keys)
    assert (interrupted / checkpoints.BEST).stat().st_size < 0.2 * base.stat().st_size

    captions = Captioner.from_pretrained(interrupted / checkpoints.BEST, device="cpu").caption(
        [toy["paths"]["image_root"] / json.loads(open(toy["train_file"]).read())[0]["image"]], num_beams=1,
        max_length=12)
    assert len(captions) == 1
    from scripts.export_hf import export

    exported = export(interrupted / checkpoints.BEST, tmp_path / "export")
    from transformers import BlipForConditionalGeneration

    _, info = BlipForConditionalGeneration.from_pretrained(exported, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # A LoRA run's checkpoint as another run's model.pretrained starts from its base with its adapters merged.
    config = training.load_config(_tiny_config(toy, tmp_path, tmp_path / "next"),
                                  [f"model.pretrained={interrupted / checkpoints.BEST}",
                                   f"model.tokenizer={toy['paths']['vocab_file']}"])
    following = training.build_captioner(config, torch.device("cpu"))
    lora_model = training.build_captioner(
        training.load_config(_tiny_config(toy, tmp_path, interrupted, name="again2"),
                             [*lora_options[1::2], f"model.tokenizer={toy['paths']['vocab_file']}"]),
        torch.device("cpu"), pretrained=str(interrupted / checkpoints.BEST))
    batch = _batch(following)
    torch.testing.assert_close(_logits(following, batch), _logits(lora_model, batch), rtol=1e-5, atol=1e-5)
