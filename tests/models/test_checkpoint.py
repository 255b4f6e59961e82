"""Checkpoint conversion and loading: original layouts, transformers directories, own checkpoints, safety."""
import json
import os
import subprocess
import sys

import pytest
import torch

import hub
from models import BlipCaptioner, CheckpointError, convert_original_state_dict, load_pretrained
from models.captioner import ARCHITECTURES, build_blip_config, build_tokenizer
from models.checkpoint import interpolate_position_embedding, read_state_dict
from tests.conftest import FIXTURES, fixture_architecture

REPO = FIXTURES.parents[1]


def _manifest_state_dict(name):
    with open(FIXTURES / name) as handle:
        rows = [json.loads(line) for line in handle]
    return {row["key"]: torch.empty(row["shape"], device="meta") for row in rows}


@pytest.mark.parametrize("preset, manifest", [("base", "blip_caption_base_manifest.jsonl"),
                                              ("large", "blip_caption_large_manifest.jsonl")])
def test_original_manifests_convert_exactly_onto_presets(preset, manifest):
    from transformers import BlipForConditionalGeneration

    original = _manifest_state_dict(manifest)
    converted = convert_original_state_dict(original)
    tokenizer = build_tokenizer(FIXTURES / "vocab.txt")
    config = build_blip_config(ARCHITECTURES[preset], 384, tokenizer)
    config.text_config.vocab_size = 30524  # BERT-base + [DEC] + [ENC]
    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    got = {key: tuple(value.shape) for key, value in converted.items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(original) - len(converted) == 1  # only the position_ids buffer


def _save_original(tmp_path, blip_fixture, extra=None):
    state = dict(blip_fixture["checkpoint"]["model"])
    state.update(extra or {})
    path = tmp_path / "model_caption.pth"
    torch.save({"model": state}, path)
    return path


def _fresh():
    return BlipCaptioner.build(fixture_architecture(), image_size=32, tokenizer=FIXTURES / "vocab.txt").eval()


def _logits(captioner, blip_fixture):
    input_ids, attention_mask = captioner.tokenize(["a dog on the grass"] * 4)
    with torch.no_grad():
        return captioner(blip_fixture["pixel_values"], input_ids, attention_mask)


def test_original_pth_file_loads_and_reports_unused_keys(tmp_path, blip_fixture, fixture_captioner):
    path = _save_original(tmp_path, blip_fixture, {"text_encoder.bert.embeddings.word_embeddings.weight": torch.zeros(3)})
    captioner = _fresh()
    report = load_pretrained(captioner, path)
    assert report.unused == ["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert "ignored 1 key(s)" in report.summary()
    torch.testing.assert_close(_logits(captioner, blip_fixture), _logits(fixture_captioner, blip_fixture))


def test_missing_vision_weight_is_an_error_listing_it(tmp_path, blip_fixture):
    state = dict(blip_fixture["checkpoint"]["model"])
    del state["visual_encoder.blocks.1.mlp.fc1.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.1\.mlp\.fc1\.weight"):
        load_pretrained(_fresh(), path)


def test_wrong_architecture_lists_mismatched_keys(tmp_path, blip_fixture):
    path = _save_original(tmp_path, blip_fixture)
    tiny = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt")
    with pytest.raises(CheckpointError, match=r"other shapes: .*checkpoint \(48,\) vs model \(64,\)"):
        load_pretrained(tiny, path)
    report = load_pretrained(tiny, path, strict=False)
    assert report.mismatched


def test_position_embeddings_are_interpolated_for_another_image_size(tmp_path, blip_fixture):
    path = _save_original(tmp_path, blip_fixture)
    captioner = BlipCaptioner.build(fixture_architecture(), image_size=64, tokenizer=FIXTURES / "vocab.txt")
    report = load_pretrained(captioner, path)
    assert report.resized and captioner.model.vision_model.embeddings.position_embedding.shape == (1, 17, 48)
    original = blip_fixture["checkpoint"]["model"]["visual_encoder.pos_embed"]
    new = captioner.model.vision_model.embeddings.position_embedding.detach()
    torch.testing.assert_close(new[:, :1], original[:, :1])  # class token untouched
    # Same grid size interpolates to itself.
    torch.testing.assert_close(interpolate_position_embedding(original, 4), original)


def test_transformers_directory_round_trip(tmp_path, blip_fixture, fixture_captioner):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from models.checkpoint import save_transformers_directory

    out = tmp_path / "hf"
    save_transformers_directory(fixture_captioner, out)
    model = BlipForConditionalGeneration.from_pretrained(out)
    processor = BlipProcessor.from_pretrained(out)
    assert processor.tokenizer.bos_token == "[DEC]" and len(processor.tokenizer) == 41
    reloaded = _fresh()
    load_pretrained(reloaded, out)
    torch.testing.assert_close(_logits(reloaded, blip_fixture), _logits(fixture_captioner, blip_fixture))
    assert set(model.state_dict()) == set(fixture_captioner.model.state_dict())


def test_convert_cli_writes_loadable_directory(tmp_path):
    tiny = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt")
    source = tmp_path / "own.pth"
    torch.save({"model": tiny.model.state_dict()}, source)
    out = tmp_path / "converted"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"), str(source), str(out),
         "--arch", "tiny", "--image-size", "32", "--tokenizer", str(FIXTURES / "vocab.txt")],
        check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    reloaded = read_state_dict(out)
    for key, value in tiny.model.state_dict().items():
        torch.testing.assert_close(reloaded[key], value)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(_fresh(), path)
    assert not (tmp_path / "pwned").exists()


def test_url_is_downloaded_once_into_cache(tmp_path, monkeypatch, blip_fixture):
    source = _save_original(tmp_path, blip_fixture)
    calls = []

    def fake_download(url, destination, progress=True):
        calls.append(url)
        with open(source, "rb") as src, open(destination, "wb") as dst:
            dst.write(src.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(hub, "require_url", lambda *args, **kwargs: None)  # no network check: nothing is fetched
    url = "https://example.invalid/BLIP/models/model_base_caption_capfilt_large.pth"
    for _ in range(2):
        load_pretrained(_fresh(), url, cache_dir=tmp_path / "cache")
    assert calls == [url]
    assert (tmp_path / "cache" / "model_base_caption_capfilt_large.pth").exists()


def test_unknown_source_names_it():
    with pytest.raises(CheckpointError, match="no/such/file.pth"):
        read_state_dict("no/such/file.pth")


def test_download_with_wrong_checksum_is_rejected_and_not_kept(tmp_path, monkeypatch, blip_fixture):
    from models.checkpoint import file_sha256

    source = _save_original(tmp_path, blip_fixture)

    def fake_download(url, destination, progress=True):
        with open(source, "rb") as src, open(destination, "wb") as dst:
            dst.write(src.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(hub, "require_url", lambda *args, **kwargs: None)  # no network check: nothing is fetched
    url = "https://example.invalid/model_caption.pth"
    with pytest.raises(CheckpointError, match="does not match the expected"):
        load_pretrained(_fresh(), url, cache_dir=tmp_path / "cache", sha256="0" * 64)
    assert not (tmp_path / "cache" / "model_caption.pth").exists()
    load_pretrained(_fresh(), url, cache_dir=tmp_path / "cache", sha256=file_sha256(source))
    assert (tmp_path / "cache" / "model_caption.pth").exists()


def test_own_checkpoint_file_round_trip_never_unpickles(tmp_path, fixture_captioner, blip_fixture):
    from models.checkpoint import load_checkpoint_file, save_checkpoint_file

    path = tmp_path / "own.safetensors"
    save_checkpoint_file(path, fixture_captioner.model.state_dict(), {"extra/x": torch.arange(3)}, {"epoch": 4})
    weights, extra, metadata = load_checkpoint_file(path)
    assert metadata == {"epoch": 4} and torch.equal(extra["extra/x"], torch.arange(3))
    reloaded = _fresh()
    load_pretrained(reloaded, path)
    torch.testing.assert_close(_logits(reloaded, blip_fixture), _logits(fixture_captioner, blip_fixture))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint_file(path)
