"""Tiny random transformers image-text-to-text models with locally built tokenizers and processors, saved as
ordinary transformers folders (what ``model.pretrained`` of ``model.family: vlm`` names), for the tests: no hub.

Each architecture gets a word-level tokenizer over a small vocabulary (``tokenizers.WordLevel`` in a
``PreTrainedTokenizerFast``; Qwen2-VL's processor insists on Qwen2's tokenizer class under transformers 4.x), its
own processor class with tiny image sizes, and (except GIT, which has none) a simple chat template whose
generation prompt ends in ``assistant :`` and whose answers end with the architecture's end-of-turn token. Works on
transformers 4.57 and 5.x.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
import transformers

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
ARCHITECTURES = ("llava", "idefics3", "qwen2_vl", "git")
IMAGE_SIZE = 32
WORDS = ("a dog cat on the grass small white table red blue green ball under next to near big little man woman "
         "describe this image . user assistant :").split()
CAPTIONS = ["a dog on the grass", "a small white cat on a table ."]


def _template(image: str, end: str, start: str = "") -> str:
    """A chat template: ``{start}role : <image> text {end} `` per turn, then ``{start}assistant :``."""
    turn = (f"{start}{{{{ m['role'] }}}} :{{% for c in m['content'] %}}{{% if c['type'] == 'image' %}} {image}"
            f"{{% else %}} {{{{ c['text'] }}}}{{% endif %}}{{% endfor %}} {end} ")
    return (f"{{% for m in messages %}}{turn}{{% endfor %}}{{% if add_generation_prompt %}}{start}assistant :"
            "{% endif %}")


def _tokenizer(specials: list[str], extra: dict[str, str], cls=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    cls = cls or PreTrainedTokenizerFast
    tokenizer = cls(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    extra_special_tokens=extra, model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_tokens(specials[4:], special_tokens=True)  # already in the vocabulary: same ids, now special
    return tokenizer, vocab


def _bpe_tokenizer(specials: list[str], extra: dict[str, str]):
    """A byte-level BPE (GPT-2 / SmolLM style: a word's leading space is part of its token, ``ĠA``) trained on
    a few sentences of ``WORDS``, with ``specials`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ([" ".join(WORDS[i : i + 6]) for i in range(len(WORDS))] * 3 + CAPTIONS * 3
              + ["User: Assistant: Describe this image."] * 3)
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=360, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", extra_special_tokens=extra,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.add_tokens(specials[4:], special_tokens=True)
    return tokenizer, tokenizer.get_vocab()


def _text_config(vocab: dict, end: str, **extra) -> dict:
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=vocab[end], tie_word_embeddings=False, **extra)


def build_llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    tokenizer, vocab = _tokenizer(specials, {"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_template("<image>", "</s>"))
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=16, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        text_config=dict(model_type="llama", **_text_config(vocab, "</s>")), image_token_index=vocab["<image>"],
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    return LlavaForConditionalGeneration(config), processor, vocab["</s>"]


# SmolVLM's own chat template, shortened: "User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n",
# generation prompt "Assistant:" (no space: the model writes " answer").
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_idefics3(smolvlm: bool = False):
    """Idefics3 with the tiny word-level tokenizer and template, or (``smolvlm``) with a byte-level BPE and
    SmolVLM's template, where the caption's first token carries the space the template leaves out."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<global-img>",
                "<end_of_utterance>", "<|im_start|>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    extra = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tokenizer, vocab = (_bpe_tokenizer if smolvlm else _tokenizer)(specials, extra)
    # A 32 px image is scaled to 64 px and cut into 2 x 2 tiles of 32 px plus the global image, as SmolVLM does.
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * IMAGE_SIZE},
                                             max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True)
    template = SMOLVLM_TEMPLATE if smolvlm else _template("<image>", "<end_of_utterance>")
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=template)
    config = Idefics3Config(
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        text_config=dict(model_type="llama", **_text_config(vocab, "<end_of_utterance>")),
        image_token_id=vocab["<image>"], scale_factor=2, pad_token_id=0, tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration(config), processor, vocab["<end_of_utterance>"]


def build_qwen2_vl():
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                "<|im_start|>", "<|im_end|>", "<|video_pad|>"]
    if TRANSFORMERS_5:
        extra, cls = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                      "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}, None
    else:  # 4.x's Qwen2VLProcessor accepts only Qwen2's tokenizer classes, and finds the tokens by name itself
        from transformers import Qwen2TokenizerFast

        extra, cls = {}, Qwen2TokenizerFast
    tokenizer, vocab = _tokenizer(specials, extra, cls)
    image_processor = Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=IMAGE_SIZE * IMAGE_SIZE, patch_size=8,
                                            merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=_template("<|vision_start|> <|image_pad|> <|vision_end|>",
                                                         "<|im_end|>", start="<|im_start|> "))
    text = _text_config(vocab, "<|im_end|>", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    # 4.x reads the text fields from the top level, 5.x from text_config.
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                           video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                           vision_end_token_id=vocab["<|vision_end|>"], **({} if TRANSFORMERS_5 else text))
    return Qwen2VLForConditionalGeneration(config), processor, vocab["<|im_end|>"]


def build_git():
    """GIT: no chat template and no image tokens in the text (the image features come first inside the model);
    the tokenizer starts every text with <s>, as BERT's [CLS]."""
    from tokenizers import processors
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer, vocab = _tokenizer(["<pad>", "<s>", "</s>", "<unk>"], {})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                               special_tokens=[("<s>", 1)])
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = GitConfig(vision_config=dict(image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2),
                       vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    return GitForCausalLM(config), processor, vocab["</s>"]


BUILDERS = {"llava": build_llava, "idefics3": build_idefics3, "qwen2_vl": build_qwen2_vl, "git": build_git,
            "smolvlm": lambda: build_idefics3(smolvlm=True)}


def save_tiny_vlm(architecture: str, folder: Path, seed: int = 0, tied: bool = False) -> Path:
    """Build the tiny random ``architecture`` (seeded) and save model + processor to ``folder``; the generation
    config stops at the end-of-turn token and pads with <pad>. ``tied``: the LM head is the word embedding (as in
    SmolVLM and Qwen2-VL-2B)."""
    torch.manual_seed(seed)
    model, processor, end_id = BUILDERS[architecture]()
    if tied:
        model.config.tie_word_embeddings = True
        model.config.get_text_config().tie_word_embeddings = True
        model.tie_weights()
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


_FOLDERS: list[tempfile.TemporaryDirectory] = []  # removed when the test process ends


@functools.lru_cache(maxsize=None)
def tiny_vlm_folder(architecture: str, tied: bool = False) -> Path:
    """The saved tiny ``architecture``, built once per test process in a temporary folder."""
    _FOLDERS.append(tempfile.TemporaryDirectory(prefix=f"tiny_{architecture}_"))
    return save_tiny_vlm(architecture, Path(_FOLDERS[-1].name), tied=tied)
