"""metrics/clip_metrics.py against naive, one-item-at-a-time implementations of each definition."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metrics.clip_metrics import (
    clip_score,
    clip_score_from_features,
    encode_images,
    encode_texts,
    extra_pool_paths,
    load_clip,
    recall_at_k,
    recall_from_ranks,
    ref_clip_score,
    ref_clip_score_from_features,
    retrieval_ranks,
    self_retrieval,
)
from metrics_fixtures import make_images, synthetic_caption

LONG = " ".join(["a large white dog sitting next to a small black cat on the green grass"] * 8)  # > 77 tokens


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="module")
def captions(image_dir):
    rng = random.Random(0)
    caps = [synthetic_caption(rng) for _ in image_dir[1]]
    caps[0], caps[1] = LONG, "Zebra-striped (!) umbrella"
    return caps


@pytest.fixture(scope="module")
def image_paths(image_dir):
    folder, names = image_dir
    return [folder / n for n in names]


# ---- naive references: one item at a time, straight from the definitions ---------------------------
@torch.no_grad()
def naive_text_features(clip, texts, prefix=""):
    rows = []
    for text in texts:
        full = (prefix + " " + text) if prefix else text
        ids = clip.tokenizer(full)["input_ids"]
        if len(ids) > 77:  # clip.tokenize(truncate=True): first 75 text tokens, then the end token
            ids = ids[:76] + [ids[-1]]
        out = clip.model.get_text_features(input_ids=torch.tensor([ids]))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        rows.append(out[0] / out[0].norm())
    return torch.stack(rows)


@torch.no_grad()
def naive_image_features(clip, paths):
    rows = []
    for path in paths:
        pixels = clip.image_processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        out = clip.model.get_image_features(pixel_values=pixels)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        rows.append(out[0] / out[0].norm())
    return torch.stack(rows)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# ---- recall@K --------------------------------------------------------------------------------------
def test_recall_at_k_by_hand_with_ties():
    similarity = torch.tensor([
        [0.9, 0.1, 0.3],   # target 0 is best -> rank 0
        [0.5, 0.5, 0.2],   # target 0 ties with item 1: nothing strictly greater -> rank 0
        [0.1, 0.8, 0.7],   # target 2: item 1 is greater -> rank 1
        [0.0, 0.0, 0.0],   # all tied -> rank 0
        [0.4, 0.6, 0.5],   # target 0: two greater -> rank 2
    ])
    target = torch.tensor([0, 0, 2, 1, 0])
    assert recall_at_k(similarity, target, ks=(1, 2, 3)) == {"R@1": 60.0, "R@2": 80.0, "R@3": 100.0}


def test_recall_at_k_matches_naive_sorting():
    torch.manual_seed(0)
    similarity = torch.randn(40, 25).round(decimals=1)  # rounding creates ties
    target = torch.randint(0, 25, (40,))
    ranks = []
    for q in range(40):
        ranks.append(sum(1 for j in range(25) if similarity[q, j] > similarity[q, target[q]]))
    expected = {f"R@{k}": 100 * sum(r < k for r in ranks) / 40 for k in (1, 5, 10)}
    assert recall_at_k(similarity, target) == pytest.approx(expected)


def test_retrieval_ranks_chunking_is_exact():
    torch.manual_seed(1)
    text, pool = F.normalize(torch.randn(30, 8), dim=-1), F.normalize(torch.randn(50, 8), dim=-1)
    target = torch.randint(0, 50, (30,))
    full = recall_at_k(text @ pool.T, target, ks=range(1, 51))
    assert recall_from_ranks(retrieval_ranks(text, pool, target, chunk_size=4, device="cpu"), ks=range(1, 51)) == full


def test_recall_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="num_queries, pool"):
        recall_at_k(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="LongTensor"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


# ---- embeddings ------------------------------------------------------------------------------------
def test_encode_texts_equals_one_at_a_time(clip, captions):
    assert len(clip.tokenizer(LONG)["input_ids"]) > 77
    got = encode_texts(captions, clip, batch_size=5, progress=False)
    assert torch.allclose(got, naive_text_features(clip, captions), atol=1e-5)
    prefixed = encode_texts(captions, clip, prefix="A photo depicts", batch_size=4, progress=False)
    assert torch.allclose(prefixed, naive_text_features(clip, captions, "A photo depicts"), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(captions)))


def test_repeated_texts_are_encoded_once(clip, captions, monkeypatch):
    texts = [captions[2], captions[3], captions[2], captions[2], captions[4]]
    seen = []
    tokenizer = clip.tokenizer

    class Counting:  # a stand-in tokenizer that records what reaches CLIP
        pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id

        def __call__(self, batch, **kwargs):
            seen.extend(batch)
            return tokenizer(batch, **kwargs)

    monkeypatch.setattr(clip, "tokenizer", Counting())
    got = encode_texts(texts, clip, batch_size=2, progress=False)
    assert seen == [captions[2], captions[3], captions[4]]
    assert torch.equal(got[0], got[2]) and torch.equal(got[0], got[3])
    assert torch.allclose(got, naive_text_features(clip, texts), atol=1e-5)


def test_encode_images_equals_one_at_a_time(clip, image_paths):
    naive = naive_image_features(clip, image_paths)
    batched = encode_images(image_paths, clip, batch_size=5, num_workers=0, progress=False)
    assert torch.allclose(batched, naive, atol=1e-5)
    pil = [Image.open(p) for p in image_paths]
    assert torch.allclose(encode_images(pil, clip, batch_size=64, progress=False), naive, atol=1e-5)
    workers = encode_images([str(p) for p in image_paths], clip, batch_size=4, num_workers=2, progress=False)
    assert torch.allclose(workers, naive, atol=1e-5)


def test_missing_and_unreadable_images_are_named(clip, image_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1 of 2 image files do not exist, e.g. \['.*nope.png'\]"):
        encode_images([image_paths[0], tmp_path / "nope.png"], clip, progress=False)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(OSError, match="cannot read image .*broken.png"):
        encode_images([broken], clip, num_workers=0, progress=False)


def test_load_clip_names_the_source(tmp_path):
    with pytest.raises(OSError, match="could not load CLIP from .*no_such_model"):
        load_clip(tmp_path / "no_such_model", device="cpu")


# ---- CLIPScore / RefCLIPScore ----------------------------------------------------------------------
def test_clip_score_from_features_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 5.0], [-1.0, 0.0]])
    # cosines 0.6, 1, -1 -> 2.5 * max(cos, 0) = 1.5, 2.5, 0
    assert torch.allclose(clip_score_from_features(image, text), torch.tensor([1.5, 2.5, 0.0]))


def test_ref_clip_score_from_features_by_hand():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    cand = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    refs = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]])
    owner = torch.tensor([0, 0, 1, 2, 2])
    # caption 0: clip 1.5, best ref cos 1.0 -> 2*1.5*1/(2.5) = 1.2
    # caption 1: clip 0 (cos 0), best ref cos -1 (raw, unclipped) -> 0
    # caption 2: clip 0 (cos -1), best ref cos 0 -> 0/0 -> defined as 0
    refclip, clip_term = ref_clip_score_from_features(image, cand, refs, owner)
    assert torch.allclose(clip_term, torch.tensor([1.5, 0.0, 0.0]))
    assert torch.allclose(refclip, torch.tensor([1.2, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"without any: \[1\]"):
        ref_clip_score_from_features(image, cand, refs[:2], torch.tensor([0, 2]))


def test_clip_score_equals_hessel_definition(clip, captions, image_paths):
    images, texts = naive_image_features(clip, image_paths), naive_text_features(clip, captions, "A photo depicts")
    per = [2.5 * max(cos(i, t), 0.0) for i, t in zip(images, texts)]
    got = clip_score(captions, image_paths, clip, batch_size=5, text_batch_size=3, num_workers=0, progress=False)
    assert got["CLIPScore"] == pytest.approx(100 * sum(per) / len(per), abs=1e-4)
    assert got["per_caption"].tolist() == pytest.approx(per, abs=1e-5)
    # the same from precomputed image features
    again = clip_score(captions, images, clip, progress=False)
    assert again["CLIPScore"] == pytest.approx(got["CLIPScore"], abs=1e-4)
    # Clipping at 0: a random model may put every pair on one side, so flip every other image's features,
    # which gives those pairs the opposite cosine.
    flipped = images * torch.tensor([1.0, -1.0]).repeat(len(images) // 2 + 1)[: len(images)].unsqueeze(1)
    per_flipped = [2.5 * max(cos(i, t), 0.0) for i, t in zip(flipped, texts)]
    assert 0 < sum(p > 0 for p in per_flipped) < len(per_flipped)  # both clipped and kept pairs
    mixed = clip_score(captions, flipped, clip, progress=False)
    assert mixed["per_caption"].tolist() == pytest.approx(per_flipped, abs=1e-5)


def test_ref_clip_score_equals_hessel_definition(clip, captions, image_paths):
    rng = random.Random(1)
    references = [[synthetic_caption(rng) for _ in range(1 + i % 4)] for i in range(len(captions))]
    images = naive_image_features(clip, image_paths)
    cands = naive_text_features(clip, captions, "A photo depicts")
    expected = []
    for image, cand, refs in zip(images, cands, references):
        ref_feats = naive_text_features(clip, refs, "A photo depicts")
        c = 2.5 * max(cos(image, cand), 0.0)
        r = max(cos(cand, ref) for ref in ref_feats)
        expected.append(2 * c * r / (c + r) if c + r != 0 else 0.0)
    got = ref_clip_score(captions, references, image_paths, clip, text_batch_size=4, num_workers=0, progress=False)
    assert got["per_caption"].tolist() == pytest.approx(expected, abs=1e-5)
    assert got["RefCLIPScore"] == pytest.approx(100 * sum(expected) / len(expected), abs=1e-4)
    plain = clip_score(captions, images, clip, progress=False)
    assert got["CLIPScore"] == pytest.approx(plain["CLIPScore"], abs=1e-4)
    with pytest.raises(ValueError, match="12 captions but 3 reference lists"):
        ref_clip_score(captions, references[:3], images, clip, progress=False)


# ---- self-retrieval --------------------------------------------------------------------------------
def naive_recall(text_feats, image_feats, ks=(1, 5, 10)):
    hits = {k: 0 for k in ks}
    for q, text in enumerate(text_feats):
        sims = [float(text @ image) for image in image_feats]
        rank = sum(1 for s in sims if s > sims[q])
        for k in ks:
            hits[k] += rank < k
    return {f"R@{k}": 100 * hits[k] / len(text_feats) for k in ks}


def test_self_retrieval_equals_naive(clip, captions, image_paths, tmp_path):
    texts, images = naive_text_features(clip, captions), naive_image_features(clip, image_paths)
    got = self_retrieval(captions, image_paths, clip, ks=(1, 2, 5), batch_size=5, num_workers=0, progress=False)
    cut = 100 / 12  # LONG, one caption of 12, is over the 77-token window
    assert got == pytest.approx({**naive_recall(texts, images, (1, 2, 5)), "retrieval_pool": 12,
                                 "retrieval_truncated_share": cut})

    # distractors: a folder of extra images, one of them an evaluated image (not added twice)
    extra_dir = tmp_path / "extra"
    names = make_images(extra_dir, 20, seed=9, prefix="distractor")
    (extra_dir / "notes.txt").write_text("not an image")
    (extra_dir / "copy.png").symlink_to(image_paths[0])
    pool = images
    pool = torch.cat([pool, naive_image_features(clip, [extra_dir / n for n in names])])
    got = self_retrieval(captions, image_paths, clip, extra_pool_images=extra_dir, num_workers=0, progress=False)
    assert got["retrieval_pool"] == 32
    assert got == pytest.approx({**naive_recall(texts, pool), "retrieval_pool": 32, "retrieval_truncated_share": cut})
    with pytest.raises(NotADirectoryError, match="nowhere"):
        self_retrieval(captions, image_paths, clip, extra_pool_images=tmp_path / "nowhere", progress=False)


def test_extra_pool_paths_lists_and_dedupes(image_paths, tmp_path):
    assert extra_pool_paths(None) == []
    listed = extra_pool_paths([image_paths[1], image_paths[2], image_paths[1]], exclude=[image_paths[2]])
    assert listed == [image_paths[1]]
    with pytest.raises(FileNotFoundError, match="extra pool image files do not exist"):
        extra_pool_paths([tmp_path / "gone.jpg"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        extra_pool_paths(empty)


# ---- long captions: the share cut at the text window, longer windows, reading by pieces ------------
SENTENCE = "a large white dog sitting next to a small black cat on the green grass."


@pytest.fixture(scope="module")
def long_clip_dir(tiny_clip_dir, tmp_path_factory):
    """The tiny CLIP with a 100-position text window (as Long-CLIP's 248 beside OpenAI's 77), random weights, and
    the tiny CLIP's tokenizer files, whose model_max_length stays 77: the window must come from the model."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("long_clip")
    for name in tiny_clip_dir.iterdir():
        if name.is_file() and not name.name.endswith((".safetensors", ".bin")) and name.name != "config.json":
            shutil.copy(name, folder / name.name)
    config = CLIPConfig.from_pretrained(tiny_clip_dir)
    config.text_config.max_position_embeddings = 100
    torch.manual_seed(1)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


def dogs(count):
    """A caption of ``count`` tokens ("dog" is one token of the tiny tokenizer), count + 2 with start and end."""
    return " ".join(["dog"] * count)


@torch.no_grad()
def embed_whole(clip, text):
    """One text's unit embedding from all its tokens, no truncation (the test checks that it fits)."""
    ids = clip.tokenizer(text)["input_ids"]
    assert len(ids) <= clip.context_length
    out = clip.model.get_text_features(input_ids=torch.tensor([ids]))
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(out[0], dim=-1)


def test_truncated_share_counts_captions_over_the_window(clip, image_paths):
    from metrics.clip_metrics import clip_token_counts, truncated_share

    assert clip.context_length == 77 and len(clip.tokenizer(dogs(75))["input_ids"]) == 77
    captions = [dogs(75), dogs(76), "a cat", LONG]  # fits exactly, one over, short, far over
    assert clip_token_counts(captions, clip).tolist() == [77, 78, 4, len(clip.tokenizer(LONG)["input_ids"])]
    assert truncated_share(captions, clip) == 50.0
    prefix_tokens = len(clip.tokenizer("A photo depicts", add_special_tokens=False)["input_ids"])
    assert truncated_share(captions, clip, prefix="A photo depicts") == 75.0 and prefix_tokens > 0
    retrieval = self_retrieval(captions, image_paths[:4], clip, num_workers=0, progress=False)
    assert retrieval["retrieval_truncated_share"] == 50.0  # retrieval reads the bare captions
    scores = ref_clip_score(captions, [["a dog"]] * 4, image_paths[:4], clip, num_workers=0, progress=False)
    assert scores["clip_truncated_share"] == 75.0  # CLIPScore reads "A photo depicts " + caption
    assert clip_score(captions, image_paths[:4], clip, num_workers=0, progress=False)["clip_truncated_share"] == 75.0
    assert truncated_share([], clip) == 0.0


def test_a_clip_with_a_longer_window_reads_it_whole(clip, long_clip_dir):
    from metrics.clip_metrics import truncated_share

    long_clip = load_clip(long_clip_dir, device="cpu")
    assert long_clip.context_length == 100 and long_clip.tokenizer.model_max_length == 77
    caption = dogs(90)  # 92 tokens: over 77, within 100
    got = encode_texts([caption, "a cat"], long_clip, progress=False)
    torch.testing.assert_close(got[0], embed_whole(long_clip, caption), atol=1e-5, rtol=1e-5)
    assert truncated_share([caption], long_clip) == 0.0 and truncated_share([caption], clip) == 100.0
    beyond = dogs(120)  # cut at the model's 100 positions, not at the tokenizer's 77
    cut = encode_texts([beyond], long_clip, progress=False)[0]
    torch.testing.assert_close(cut, embed_whole(long_clip, dogs(98)), atol=1e-5, rtol=1e-5)


def test_split_long_texts_packs_sentences_and_splits_long_sentences_into_words(clip):
    from metrics.clip_metrics import split_long_texts

    per_sentence = len(clip.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
    fit = (77 - 2) // per_sentence  # whole sentences per piece
    long_text = " ".join([SENTENCE] * (2 * fit + 1))
    words = " ".join(["dog"] * 100)  # one 100-token "sentence": word runs of 75 and 25
    pieces, owner = split_long_texts(["a cat", long_text, words], clip)
    block = " ".join([SENTENCE] * fit)
    assert pieces == ["a cat", block, block, SENTENCE, dogs(75), dogs(25)]
    assert owner.tolist() == [0, 1, 1, 1, 2, 2]
    prefix = "A photo depicts"
    budget = 77 - 2 - len(clip.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    pieces, owner = split_long_texts([f"{prefix} {words}"], clip, keep_prefixes=[prefix])
    assert pieces == [f"{prefix} {dogs(budget)}", f"{prefix} {dogs(100 - budget)}"]
    assert all(len(clip.tokenizer(p)["input_ids"]) <= 77 for p in pieces)


def test_chunked_scores_equal_a_hand_computation(clip, image_paths):
    """clip_score with long_text="chunks" against each piece embedded alone and the pieces' mean taken by hand."""
    prefix = "A photo depicts"
    per_sentence = len(clip.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
    budget = 77 - 2 - len(clip.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    fit = budget // per_sentence
    long_caption = " ".join([SENTENCE] * (fit + 2))
    captions = ["a dog on the grass", long_caption, dogs(120)]
    got = clip_score(captions, image_paths[:3], clip, num_workers=0, progress=False, long_text="chunks")

    hand_pieces = [["a dog on the grass"],
                   [" ".join([SENTENCE] * fit), " ".join([SENTENCE] * 2)],
                   [dogs(budget), dogs(120 - budget)]]
    images = naive_image_features(clip, image_paths[:3])
    for k, pieces in enumerate(hand_pieces):
        embedded = torch.stack([embed_whole(clip, f"{prefix} {piece}") for piece in pieces])  # (pieces, D)
        text = embedded.mean(dim=0)
        text = text / text.norm()
        want = 2.5 * max(cos(images[k], text), 0.0)
        assert float(got["per_caption"][k]) == pytest.approx(want, abs=1e-5)
    assert got["clip_truncated_share"] == pytest.approx(200 / 3)  # both long captions are over the window
    truncated = clip_score(captions, image_paths[:3], clip, num_workers=0, progress=False)
    # a caption that fits: the same tokens, equal up to the rounding of other batch shapes (the pieces pad longer)
    assert float(truncated["per_caption"][0]) == pytest.approx(float(got["per_caption"][0]), abs=1e-6)


def test_chunks_leave_texts_that_fit_exactly_as_they_were(clip, captions):
    short = [c for c in captions if len(clip.tokenizer(c)["input_ids"]) <= 77]
    assert torch.equal(encode_texts(short, clip, batch_size=4, progress=False, long_text="chunks"),
                       encode_texts(short, clip, batch_size=4, progress=False))
    mixed = encode_texts(captions, clip, batch_size=4, progress=False, long_text="chunks")
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(len(captions)))
    with pytest.raises(ValueError, match=r"long_text must be one of \['truncate', 'chunks'\], got 'split'"):
        encode_texts(captions, clip, progress=False, long_text="split")


def test_metric_session_reads_long_captions_by_the_option(tiny_clip_dir, image_dir):
    """compute_metrics' retrieval and clipscore groups with clip_long_text="chunks" equal the functions above, and
    report the shares cut; MetricOptions refuses an unknown mode, naming the option."""
    from metrics.suite import MetricOptions, compute_metrics

    folder, names = image_dir
    long_caption = " ".join([SENTENCE] * 8)
    captions = ["a dog on the grass", long_caption, "a red bus", dogs(75)]  # dogs(75) fits only bare
    gt = {"images": [{"id": k, "file_name": n} for k, n in enumerate(names[:4])],
          "annotations": [{"id": k, "image_id": k, "caption": "a dog and a cat"} for k in range(4)]}
    results = [{"image_id": k, "caption": c} for k, c in enumerate(captions)]
    paths = [folder / n for n in names[:4]]
    for mode in ("truncate", "chunks"):
        scores = compute_metrics(results, gt, ["retrieval", "clipscore"], images_root=folder, clip_model=tiny_clip_dir,
                                 device="cpu", num_workers=0, progress=False, overlap=False, clip_long_text=mode)
        assert scores["retrieval_truncated_share"] == 25.0 and scores["clip_truncated_share"] == 50.0
        want = ref_clip_score(captions, [["a dog and a cat"]] * 4, paths, tiny_clip_dir, num_workers=0,
                              progress=False, device="cpu", long_text=mode)
        assert scores["CLIPScore"] == pytest.approx(want["CLIPScore"], abs=1e-4)
        assert scores["RefCLIPScore"] == pytest.approx(want["RefCLIPScore"], abs=1e-4)
        retrieval = self_retrieval(captions, paths, tiny_clip_dir, num_workers=0, progress=False, device="cpu",
                                   long_text=mode)
        assert {k: scores[k] for k in retrieval} == pytest.approx(retrieval, abs=1e-9)
    with pytest.raises(ValueError, match=r"clip_long_text \(MetricOptions, eval.clip_long_text\) must be one of"):
        MetricOptions(clip_long_text="sentences")


def test_eval_caption_results_mode_reads_long_captions_as_asked(tmp_path, image_paths, tiny_clip_dir):
    """``eval_caption.py --results ... --clip-long-text chunks`` scores a results file as eval.clip_long_text does a
    run: the long caption's CLIPScore changes, the short one's does not, and the cut share is reported both ways."""
    import eval_caption

    gt = {"images": [{"id": index, "file_name": path.name} for index, path in enumerate(image_paths[:2])],
          "annotations": [{"image_id": index, "id": index, "caption": "a dog"} for index in range(2)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps([{"image_id": 0, "caption": LONG},
                                                       {"image_id": 1, "caption": "a dog on the grass"}]))
    scores = {}
    for mode in ("truncate", "chunks"):
        scores[mode] = eval_caption.main(
            ["--results", str(tmp_path / "results.json"), "--annotations", str(tmp_path / "gt.json"),
             "--images-root", str(image_paths[0].parent), "--metrics", "clipscore", "--clip-model",
             str(tiny_clip_dir), "--clip-long-text", mode, "--out", str(tmp_path / f"{mode}.json")])
        assert scores[mode]["clip_truncated_share"] == pytest.approx(50.0)
    assert scores["chunks"]["CLIPScore"] != pytest.approx(scores["truncate"]["CLIPScore"], abs=1e-4)
    with pytest.raises(SystemExit):
        eval_caption.main(["--results", "r.json", "--annotations", "g.json", "--clip-long-text", "middle"])


RACE = r'''
import importlib.abc, importlib.machinery, pathlib, sys, tempfile, threading, time
from metrics import clip_metrics

clip_dir, paths = sys.argv[1], sys.argv[2:]
# A module the image preprocessing imports lazily, as PIL imported a format's plugin on its first image (imaging.py
# now imports them all up front): the main thread's import of it takes 4 s (a descheduled thread).
folder = tempfile.mkdtemp()
pathlib.Path(folder, "lazy_plugin.py").write_text("VALUE = 1\n")
sys.path.insert(0, folder)

class SlowLoader(importlib.abc.Loader):
    def __init__(self, inner): self.inner = inner
    def create_module(self, spec): return self.inner.create_module(spec)
    def exec_module(self, module):
        if threading.current_thread() is threading.main_thread():
            time.sleep(4)
        self.inner.exec_module(module)

class SlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lazy_plugin": return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = SlowLoader(spec.loader)
        return spec

sys.meta_path.insert(0, SlowFinder())
preprocess = clip_metrics._Preprocess.__call__
def lazily(self, batch):
    import lazy_plugin  # noqa: F401
    return preprocess(self, batch)
clip_metrics._Preprocess.__call__ = lazily

clip = clip_metrics.load_clip(clip_dir, "cpu")
done = {}
def lane():  # MetricSession's background encoding, starting while the main thread is inside the import
    time.sleep(1)
    done["shape"] = tuple(clip_metrics.encode_images(paths, clip, batch_size=4, num_workers=2, progress=False).shape)
thread = threading.Thread(target=lane, daemon=True)
thread.start()
import lazy_plugin  # noqa: E402,F401  (the captioner's first image, in the main thread)
thread.join(60)
print("HUNG" if thread.is_alive() else f"done {done['shape']}", flush=True)
'''


def test_images_encoded_beside_a_main_thread_import_never_hang(tmp_path, image_paths, tiny_clip_dir):
    """encode_images in a background thread (MetricSession's) while the main thread imports a module the image
    preprocessing imports too: worker processes forked at that instant inherited the held import lock and waited
    forever (evaluations hung after "coco took ... s", the module being PIL's plugin for the images' format); the
    threads it uses now wait for the import and go on."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    paths = [str(path) for path in image_paths[:9]]  # 3 batches of 4 over 2 workers
    done = subprocess.run([sys.executable, str(script), str(tiny_clip_dir), *paths], capture_output=True,
                          text=True, timeout=180, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "done (9, 16)", done.stdout


def test_threaded_image_batches_equal_the_one_thread_ones_and_stop_early(clip, image_paths):
    from metrics.clip_metrics import _pixel_batches

    one = list(_pixel_batches(image_paths, clip.image_processor, 5, 0))
    threaded = list(_pixel_batches(image_paths, clip.image_processor, 5, 3))
    assert [b.shape[0] for b in threaded] == [5, 5, 2] and all(torch.equal(a, b) for a, b in zip(one, threaded))
    batches = _pixel_batches(image_paths, clip.image_processor, 1, 2)
    next(batches)
    batches.close()  # the consumer stops: the pool is shut down, no thread left behind
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("clip-images")]
