"""Every registered model family implements the whole ``CaptionModel`` interface (models/families.py) on a tiny
built instance, ``caption_loss`` applies objectives alike to all of them, and their optimizer parameter groups are
right (trainable parameters only, each once, no decay on norms, biases and embeddings when asked)."""
import inspect
import shutil

import pytest
import torch
import yaml
from torch import nn

import training
from models import CAPTIONER_FAMILIES, CaptionModel, CaptionObjective
from models.objectives import IGNORE_INDEX, HeadFeatures, caption_loss
from models.parameter_groups import DECAYED_LAYERS
from tests.conftest import FIXTURES
from tests.models.tiny_vlms import tiny_vlm_folder
from training import checkpoints

TINY_GPT2 = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 453}
TINY_CLIP = {"image_size": 32, "patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "projection_dim": 16}
CAPTIONS = ["a dog on the grass", "a small white cat on a table"]


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    """The original ClipCap fixture's tiny GPT-2 BPE (453 ids) as a tokenizer folder."""
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    shutil.copy(FIXTURES / "clipcap_original" / "gpt2_vocab.json", folder / "vocab.json")
    shutil.copy(FIXTURES / "clipcap_original" / "gpt2_merges.txt", folder / "merges.txt")
    return folder


def tiny_model_section(family: str, gpt2_tokenizer, **prefix_options) -> dict:
    """A resolved ``model`` section (configs/default.yaml + overrides) of a tiny random captioner of ``family``.
    A family added to CAPTIONER_FAMILIES needs its entry here, so that this file checks it too."""
    sections = {
        "blip": {"arch": "tiny", "image_size": 32, "tokenizer": str(FIXTURES / "vocab.txt")},
        "prefix": {"max_text_length": 20, "prefix": {"gpt2": TINY_GPT2, "clip": TINY_CLIP,
                                                     "tokenizer": str(gpt2_tokenizer), "prefix_length": 2,
                                                     **prefix_options}},
        # A tiny random LLaVA folder with its processor (tests/models/tiny_vlms.py; the other architectures are
        # checked in tests/models/test_vlm_captioner.py).
        "vlm": {"pretrained": str(tiny_vlm_folder("llava")), "max_text_length": 20},
    }
    return {**sections[family], "family": family}


def build_tiny(family, gpt2_tokenizer, tmp_path, **prefix_options):
    config_file = tmp_path / f"{family}.yaml"
    config_file.write_text(yaml.safe_dump({"model": tiny_model_section(family, gpt2_tokenizer, **prefix_options)}))
    config = training.load_config(config_file)
    torch.manual_seed(0)
    return training.build_captioner(config, torch.device("cpu")), config


def interface_members() -> tuple[set[str], set[str], set[str]]:
    """(attributes, methods, classmethods) that ``CaptionModel`` lists."""
    attributes = set(CaptionModel.__annotations__)
    methods, classmethods = set(), set()
    for name, value in vars(CaptionModel).items():
        if name.startswith("_"):
            continue
        (classmethods if isinstance(value, classmethod) else methods).add(name)
    return attributes, methods, classmethods


def test_the_interface_lists_what_the_trainer_and_the_api_call():
    attributes, methods, classmethods = interface_members()
    assert {"model", "training", "image_size", "max_positions", "device"} <= attributes
    assert {"sample_ids", "sequence_mask", "export_directory", "compile_parts", "encode_cache_batch",
            "parameter_groups", "forward", "generate", "tokenize", "build_targets", "decode"} <= methods
    assert {"from_config", "check_config", "config_sources", "accepts_hub_weights", "inference_config",
            "from_exported"} <= classmethods


@pytest.mark.parametrize("family", sorted(CAPTIONER_FAMILIES))
def test_every_family_implements_the_whole_interface(family, gpt2_tokenizer, tmp_path):
    cls = CAPTIONER_FAMILIES[family]
    captioner, config = build_tiny(family, gpt2_tokenizer, tmp_path)
    assert isinstance(captioner, cls) and isinstance(captioner, nn.Module) and isinstance(captioner, CaptionModel)
    attributes, methods, classmethods = interface_members()
    assert isinstance(captioner.model, nn.Module) and isinstance(captioner.training, bool)
    assert isinstance(captioner.image_size, int) and isinstance(captioner.max_positions, int)
    assert isinstance(captioner.device, torch.device) and attributes == {
        "model", "training", "image_size", "max_positions", "device"}
    for name in methods | classmethods:
        implementation = getattr(cls, name, None)
        assert callable(implementation), f"{cls.__name__} lacks {name}"
        if name in classmethods:
            assert inspect.ismethod(implementation) and implementation.__self__ is cls, f"{name}: not a classmethod"
        wanted = inspect.signature(getattr(CaptionModel, name)).parameters
        given = inspect.signature(implementation).parameters
        open_ended = any(p.kind is p.VAR_KEYWORD for p in given.values())
        for parameter in wanted.values():
            if parameter.name in ("self", "cls") or parameter.kind in (parameter.VAR_POSITIONAL,
                                                                         parameter.VAR_KEYWORD):
                continue
            assert parameter.name in given or open_ended, f"{cls.__name__}.{name} lacks parameter {parameter.name}"

    # The classmethods answer on this config without building anything.
    model_config = config["model"]
    cls.check_config(model_config, toy=False)
    sources = cls.config_sources(model_config)
    assert all(len(entry) == 3 and entry[0].startswith("model.") for entry in sources)
    assert isinstance(cls.accepts_hub_weights("owner/name"), bool)
    assert cls.from_exported(str(tmp_path / "nothing here")) is None
    rebuilt = cls.inference_config(model_config, tmp_path / "checkpoint.safetensors")
    assert rebuilt["family"] == family and rebuilt["gradient_checkpointing"] is False


@pytest.mark.parametrize("family", sorted(CAPTIONER_FAMILIES))
def test_every_family_trains_samples_generates_and_exports_through_the_interface(family, gpt2_tokenizer, tmp_path):
    captioner, _ = build_tiny(family, gpt2_tokenizer, tmp_path)
    captioner.eval()
    images = torch.randn(2, 3, captioner.image_size, captioner.image_size, generator=torch.Generator().manual_seed(0))
    input_ids, attention_mask = captioner.tokenize(CAPTIONS)
    targets = captioner.build_targets(input_ids, attention_mask)
    with torch.no_grad():
        logits = captioner(images, input_ids, attention_mask)
        head = captioner(images, input_ids, attention_mask, head_features=True)
    assert logits.shape[:2] == targets.shape and isinstance(head, HeadFeatures)
    rebuilt = head.features @ head.weight.T + (0 if head.bias is None else head.bias)
    torch.testing.assert_close(rebuilt, logits, atol=1e-5, rtol=1e-5)
    for spec in ("smile", {"mle": 0.3, "smile": 0.7}):  # the feature path and the logits path
        objective = CaptionObjective(spec)
        loss, parts = caption_loss(captioner, objective, images, input_ids, attention_mask, targets)
        expected, _ = objective(captioner(images, input_ids, attention_mask), targets)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    rollouts = captioner.sample_ids(images, num_samples=2, max_new_tokens=5)
    mask = captioner.sequence_mask(rollouts)
    assert rollouts.shape[0] == 4 and mask.shape == rollouts.shape and set(mask.unique().tolist()) <= {0, 1}
    rollout_targets = captioner.build_targets(rollouts, mask)
    with torch.no_grad():
        rollout_logits = captioner(images, rollouts, mask, image_index=torch.arange(2).repeat_interleave(2))
    assert rollout_logits.shape[:2] == rollout_targets.shape and (rollout_targets != IGNORE_INDEX).any()
    assert len(captioner.decode(rollouts)) == 4
    captions = captioner.generate(images, num_beams=2, max_length=8, min_length=1)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    assert captioner.eval_transform() is not None

    exported = captioner.export_directory(tmp_path / "export")
    loaded = type(captioner).from_exported(str(exported))
    assert loaded is not None and type(loaded) is type(captioner)


def _decayed_names(captioner, groups):
    names = {id(p): name for name, p in captioner.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in groups]


@pytest.mark.parametrize("family, options", [("blip", {}), ("prefix", {}), ("prefix", {"only_prefix": True}),
                                             ("prefix", {"train_vision": True}), ("vlm", {})])
def test_parameter_groups_hold_each_trainable_parameter_once_and_decay_only_matrices(family, options,
                                                                                      gpt2_tokenizer, tmp_path):
    captioner, _ = build_tiny(family, gpt2_tokenizer, tmp_path, **options)
    trainable = [p for p in captioner.parameters() if p.requires_grad]
    for decay_all in (True, False):
        groups = captioner.parameter_groups(0.05, decay_all=decay_all)
        grouped = [p for group in groups for p in group["params"]]
        assert len({id(p) for p in grouped}) == len(grouped) == len(trainable)  # each exactly once
        assert {id(p) for p in grouped} == {id(p) for p in trainable}  # trainable only
        if decay_all:
            assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05 and grouped == trainable
            continue
        decayed = [group for group in groups if group["weight_decay"] > 0]
        undecayed = [group for group in groups if group["weight_decay"] == 0]
        assert len(decayed) == len(undecayed) == 1
        embeddings = {id(m.weight) for m in captioner.modules() if isinstance(m, nn.Embedding)}
        matrices = {id(m.weight) for m in captioner.modules() if isinstance(m, DECAYED_LAYERS)} - embeddings
        for param in decayed[0]["params"]:
            assert id(param) in matrices and param.dim() >= 2
        for param in undecayed[0]["params"]:
            assert id(param) not in matrices
        undecayed_ids = {id(p) for p in undecayed[0]["params"]}
        norms = {id(p) for m in captioner.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        for param in trainable:  # biases, norm scales and embedding tables are never decayed
            if param.dim() < 2 or id(param) in norms | embeddings:
                assert id(param) in undecayed_ids
    if family == "blip":  # the ViT's class and position embeddings and the tied LM head get no decay
        names = _decayed_names(captioner, captioner.parameter_groups(0.05, decay_all=False))[1]
        assert {"model.vision_model.embeddings.class_embedding", "model.vision_model.embeddings.position_embedding",
                "model.text_decoder.bert.embeddings.word_embeddings.weight"} <= names
    if options.get("only_prefix"):
        assert all(name.startswith("model.clip_project.") for name, p in captioner.named_parameters()
                   if p.requires_grad)


def test_build_optimizer_is_blips_adamw_by_default(gpt2_tokenizer, tmp_path):
    captioner, config = build_tiny("blip", gpt2_tokenizer, tmp_path)
    optimizer = training.build_optimizer(captioner, config)
    assert len(optimizer.param_groups) == 1  # AdamW(model.parameters(), weight_decay=0.05), as train_caption.py
    assert optimizer.param_groups[0]["params"] == list(captioner.parameters())
    assert optimizer.param_groups[0]["weight_decay"] == config["train"]["weight_decay"]
    config["train"]["decay_all_parameters"] = False
    assert [group["weight_decay"] for group in training.build_optimizer(captioner, config).param_groups] == [
        config["train"]["weight_decay"], 0.0]


def test_a_state_saved_over_every_parameter_resumes_into_the_trainable_groups(gpt2_tokenizer, tmp_path):
    """A single-group AdamW over every parameter, the frozen CLIP tower included (the layout of older
    checkpoints), loads into the optimizer ``build_optimizer`` makes, each parameter's moments where they belong."""
    captioner, config = build_tiny("prefix", gpt2_tokenizer, tmp_path)
    config["train"]["decay_all_parameters"] = False
    every = list(captioner.parameters())
    legacy = torch.optim.AdamW(every, lr=1e-3, weight_decay=0.01)
    for param in every:
        if param.requires_grad:
            param.grad = torch.randn_like(param)
    legacy.step()
    tensors, meta = checkpoints.optimizer_to_flat(legacy)
    optimizer = training.build_optimizer(captioner, config)
    assert sum(len(group["params"]) for group in optimizer.param_groups) < len(every)  # the tower is left out
    checkpoints.optimizer_from_flat(optimizer, tensors, meta)
    for param in every:
        if param.requires_grad:
            torch.testing.assert_close(optimizer.state[param]["exp_avg"], legacy.state[param]["exp_avg"])
            torch.testing.assert_close(optimizer.state[param]["exp_avg_sq"], legacy.state[param]["exp_avg_sq"])
        else:
            assert param not in optimizer.state
    assert [group["weight_decay"] for group in optimizer.param_groups] == [config["train"]["weight_decay"], 0.0]
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)  # the saved hyperparameters


def test_bad_family_sections_are_config_errors_before_anything_is_built(gpt2_tokenizer, tmp_path):
    from utils import ConfigError

    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"family": "prefix", "prefix": {"gpt2": None}}}))
    config = training.load_config(config_file)
    with pytest.raises(ConfigError, match="model.prefix.gpt2 is not set"):
        training.check_inputs(config)
    blip = training.load_config(config_file, ["model.family=blip", "model.tokenizer=null"])
    with pytest.raises(ConfigError, match="model.tokenizer is null"):
        training.check_inputs(blip)


@pytest.mark.parametrize("family", sorted(CAPTIONER_FAMILIES))
def test_the_captioner_api_loads_a_training_checkpoint_of_every_family(family, gpt2_tokenizer, tmp_path):
    from PIL import Image

    from models import Captioner

    captioner, config = build_tiny(family, gpt2_tokenizer, tmp_path)
    path = tmp_path / "checkpoint_best.safetensors"
    checkpoints.save_training_checkpoint(path, captioner.model, None, config, checkpoints.TrainProgress())
    api = Captioner.from_pretrained(path, device="cpu")
    assert type(api.model) is type(captioner)
    image = Image.new("RGB", (40, 30), (200, 40, 90))
    options = dict(num_beams=2, max_length=8, min_length=1)
    pixels = captioner.eval_transform()(image).unsqueeze(0)
    assert api.caption(image, **options) == captioner.eval().generate(pixels, **options)[0]
