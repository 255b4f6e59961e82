"""metrics/rewards.py: the registry, weights, CLIP-S against the evaluation CLIPScore, images encoded once."""
import pytest
import torch

import metrics.rewards as rewards
from metrics.clip_metrics import clip_score, load_clip, ref_clip_score
from metrics.rewards import GrammarHead, RewardMixture, load_grammar_model, save_grammar_head

REFS = {1: ["a red dog on the grass", "a dog sitting on the grass"], 2: ["a cat on a table", "a white cat"],
        3: ["a bus in the street", "a large bus parked"]}


def batch():
    # 3 images x 2 samples, then 3 greedy captions
    captions = ["a dog on the grass", "dog dog", "a cat on the table", "a table", "a bus", "",
                "a red dog", "a white cat", "a large bus in the street"]
    index = [0, 0, 1, 1, 2, 2, 0, 1, 2]
    return captions, index


def test_cider_d_reward_and_mixture_weights():
    captions, index = batch()
    mixture = RewardMixture({"cider_d": {"weight": 0.5, "sigma": 6.0}}, references=REFS)
    total, parts = mixture(captions, index, keys=[1, 2, 3])
    want = torch.from_numpy(mixture.components[0][2].scorer.score(captions, [[1, 2, 3][i] for i in index])).float()
    torch.testing.assert_close(parts["cider_d"], want)
    torch.testing.assert_close(total, 0.5 * want)
    assert parts["cider_d"][5] == 0  # the empty caption


def test_clip_rewards_equal_the_evaluation_metrics_and_encode_each_image_once(tiny_clip_dir, image_dir, monkeypatch):
    folder, names = image_dir
    images = [folder / n for n in names[:3]]
    captions, index = batch()
    calls = []
    real = rewards.encode_images
    monkeypatch.setattr(rewards, "encode_images", lambda imgs, *a, **k: calls.append(len(imgs)) or real(imgs, *a, **k))
    mixture = RewardMixture({"clip_s": 2.0, "ref_clip_s": 1.0}, references=REFS, clip_model=tiny_clip_dir, device="cpu")
    total, parts = mixture(captions, index, images=images, keys=[1, 2, 3])
    assert calls == [3]  # B images once, shared by clip_s and ref_clip_s and by the 9 captions
    clip = load_clip(tiny_clip_dir, "cpu")
    per_image = [images[i] for i in index]
    want = clip_score(captions, per_image, clip, progress=False)["per_caption"]
    torch.testing.assert_close(parts["clip_s"], want.float(), atol=1e-5, rtol=1e-5)
    ref = ref_clip_score(captions, [REFS[[1, 2, 3][i]] for i in index], per_image, clip, progress=False)
    torch.testing.assert_close(parts["ref_clip_s"], ref["per_caption"].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, 2.0 * parts["clip_s"] + parts["ref_clip_s"])


def test_grammar_reward_loads_the_saved_head_and_clip_s_uses_that_clip(tiny_clip_dir, image_dir, tmp_path):
    import shutil

    folder, names = image_dir
    model_dir = tmp_path / "grammar"
    shutil.copytree(tiny_clip_dir, model_dir)
    clip = load_clip(model_dir, "cpu")
    torch.manual_seed(0)
    head = GrammarHead(clip.model.config.text_config.hidden_size, clip.model.config.projection_dim)
    save_grammar_head(model_dir, head)
    captions, index = batch()
    mixture = RewardMixture({"grammar": 1.0, "clip_s": 2.0}, grammar_model=model_dir, device="cpu")
    total, parts = mixture(captions, index, images=[folder / n for n in names[:3]])
    assert mixture.context.clip() is mixture.context.grammar().clip
    loaded = load_grammar_model(model_dir, "cpu")
    with torch.no_grad():
        pooled = rewards.pooled_text_features(clip.model, clip.tokenizer, captions, "A photo depicts", "cpu")
        want = head(pooled).softmax(-1)[:, 1]
    torch.testing.assert_close(parts["grammar"], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loaded.probability(captions), want, atol=1e-6, rtol=1e-6)
    assert ((parts["grammar"] > 0) & (parts["grammar"] < 1)).all()


def test_bad_specs_fail_with_the_valid_choices():
    with pytest.raises(ValueError, match="unknown reward 'cidr'.*cider_d"):
        RewardMixture({"cidr": 1.0}, references=REFS)
    with pytest.raises(ValueError, match="unknown option.*valid options"):
        RewardMixture({"cider_d": {"weight": 1.0, "sgima": 2}}, references=REFS)
    with pytest.raises(ValueError, match="reward.cider_d: weight must be a number, got 'heavy'"):
        RewardMixture({"cider_d": "heavy"}, references=REFS)
    with pytest.raises(ValueError, match="needs the training references"):
        RewardMixture("cider_d")
    with pytest.raises(ValueError, match="grammar_model"):
        RewardMixture("grammar")
    with pytest.raises(ValueError, match=r"image_index values must lie in \[0, 3\)"):
        RewardMixture("cider_d", references=REFS)(["a"], [5], keys=[1, 2, 3])


def test_clip_s_reads_long_captions_by_the_option_and_reports_the_share_cut(tiny_clip_dir, image_dir):
    folder, names = image_dir
    images = [folder / n for n in names[:2]]
    long_caption = " ".join(["a large white dog sitting next to a small black cat on the green grass."] * 8)
    captions, index = ["a dog on the grass", long_caption, "a white cat", long_caption], [0, 0, 1, 1]
    clip = load_clip(tiny_clip_dir, "cpu")
    per_image = [images[i] for i in index]
    for mode in ("truncate", "chunks"):
        spec = {"clip_s": {"weight": 1.0, "long_text": mode}, "ref_clip_s": {"weight": 1.0, "long_text": mode}}
        mixture = RewardMixture(spec, references=REFS, clip_model=tiny_clip_dir, device="cpu")
        _, parts = mixture(captions, index, images=images, keys=[1, 2])
        want = clip_score(captions, per_image, clip, progress=False, long_text=mode)
        torch.testing.assert_close(parts["clip_s"], want["per_caption"].float(), atol=1e-5, rtol=1e-5)
        ref = ref_clip_score(captions, [REFS[[1, 2][i]] for i in index], per_image, clip, progress=False,
                             long_text=mode)
        torch.testing.assert_close(parts["ref_clip_s"], ref["per_caption"].float(), atol=1e-5, rtol=1e-5)
        assert mixture.last_stats == {"clip_truncated_share": 50.0} == {"clip_truncated_share":
                                                                        want["clip_truncated_share"]}
    with pytest.raises(ValueError, match="reward option long_text must be one of"):
        RewardMixture({"clip_s": {"weight": 1.0, "long_text": "all"}}, clip_model=tiny_clip_dir, device="cpu")
