"""metrics/cider_d.py: equal to a direct transcription of the CIDEr-D definition, and to pycocoevalcap's
``Cider`` (the same formula with corpus document frequencies) when the references are the scored set."""
import math
import random
from collections import Counter

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from metrics.cider_d import CiderD, file_sha256
from metrics_fixtures import synthetic_caption


def naive_cider_d(references, candidates, keys, n=4, sigma=6.0, clip=True):
    """CIDEr-D written out from its definition with dictionaries (see metrics/cider_d.py's docstring)."""
    def grams(text):
        words = text.split()
        return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

    df = Counter()
    for refs in references.values():
        df.update(set(g for r in refs for g in grams(r)))
    log_n = math.log(len(references))

    def vector(text):
        counts = grams(text)
        vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
        norm = [math.sqrt(sum(v * v for g, v in vec.items() if len(g) == k)) for k in range(1, n + 1)]
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, norm, length

    scores = []
    for cand, key in zip(candidates, keys):
        vh, nh, lh = vector(cand)
        total = 0.0
        for ref in references[key]:
            vr, nr, lr = vector(ref)
            for k in range(1, n + 1):
                val = sum((min(w, vr.get(g, 0.0)) if clip else w) * vr.get(g, 0.0)
                          for g, w in vh.items() if len(g) == k)
                if nh[k - 1] != 0 and nr[k - 1] != 0:
                    val /= nh[k - 1] * nr[k - 1]
                total += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2)) / n
        scores.append(10.0 * total / len(references[key]))
    return np.array(scores)


def training_refs(num_images=40, seed=0):
    rng = random.Random(seed)
    return {i: [synthetic_caption(rng).lower().rstrip(".") for _ in range(rng.randint(3, 6))]
            for i in range(num_images)}


REFS = training_refs()
REFS["special"] = ["a dog on a dog on a dog", "a dog", "the cat sat on the mat near the dog"]
REFS[("tuple", 1)] = ["a dog", "a dog", ""]  # repeated references and an empty one; any hashable key
CASES = [
    (REFS[0][0], 0),                                  # a copy of one reference
    (REFS[1][1].replace("the", "a"), 1),              # paraphrase-ish
    ("a dog", "special"),                             # short, equals one reference
    ("dog dog dog dog dog dog dog", "special"),       # repeats: clipped at the reference's tf
    ("a dog on a dog on a dog on a dog on a dog on a dog on a dog", "special"),  # long: length penalty
    ("a zebra xylophone quokka on the mat", "special"),  # unseen words
    ("quokka", 3),                                    # only an unseen word
    ("", 2),                                          # the empty caption
    ("a", 4),                                         # one word (zero bigrams)
    ("the the the the", 5),
    (" ".join(REFS[6][0].split()[::-1]), 6),          # the right words in the wrong order
    (REFS[7][0], 8),                                  # another image's caption
    ("a dog", ("tuple", 1)),
    ("a dog a dog", ("tuple", 1)),
]


def test_equals_naive_definition_on_varied_cases():
    candidates, keys = [c for c, _ in CASES], [k for _, k in CASES]
    scorer = CiderD(REFS)
    got = scorer.score(candidates, keys)
    want = naive_cider_d(REFS, candidates, keys)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[7] == 0.0 and got[6] == 0.0
    assert got[0] > got[1] > 0 and got[0] > got[11]
    # the repeats case does exercise the clipping: without it the score would be higher
    assert naive_cider_d(REFS, [CASES[3][0]], ["special"], clip=False)[0] > got[3] + 0.1
    # the long caption is penalised for its length: a shorter prefix with the same words scores higher
    assert got[4] < scorer.score(["a dog on a dog on a dog"], ["special"])[0]


def test_equals_naive_definition_on_random_batches():
    rng = random.Random(3)
    refs = training_refs(60, seed=11)
    words = "a the dog cat on in red big small sitting zebra quokka".split()
    candidates, keys = [], []
    for _ in range(200):
        key = rng.randrange(60)
        if rng.random() < 0.5:
            candidates.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 18))))
        else:
            ref = rng.choice(refs[key]).split()
            candidates.append(" ".join(ref[:rng.randint(1, len(ref))] * rng.randint(1, 2)))
        keys.append(key)
    scorer = CiderD(refs)
    np.testing.assert_allclose(scorer.score(candidates, keys), naive_cider_d(refs, candidates, keys),
                               rtol=1e-12, atol=1e-12)
    # n and sigma other than the defaults
    for n, sigma in ((1, 6.0), (2, 1.5), (5, 10.0)):
        got = CiderD(refs, n=n, sigma=sigma).score(candidates[:50], keys[:50])
        np.testing.assert_allclose(got, naive_cider_d(refs, candidates[:50], keys[:50], n=n, sigma=sigma),
                                   rtol=1e-12, atol=1e-12)


def test_equals_pycocoevalcap_cider_when_references_are_the_scored_set():
    """pycocoevalcap's Cider is CIDEr-D with df from the scored set: score every key once and they agree."""
    refs = training_refs(30, seed=4)
    rng = random.Random(9)
    candidates = [synthetic_caption(rng).lower().rstrip(".") for _ in refs]
    candidates[3] = refs[3][0]
    candidates[5] = ""
    keys = list(refs)
    _, want = Cider().compute_score({k: refs[k] for k in keys}, {k: [c] for k, c in zip(keys, candidates)})
    np.testing.assert_allclose(CiderD(refs).score(candidates, keys), want, rtol=1e-12, atol=1e-12)


def test_document_frequencies_come_from_the_references_not_the_batch():
    scorer = CiderD(REFS)
    def images_with(gram):
        return sum(any(f" {gram} " in f" {r} " for r in refs) for refs in REFS.values())
    for gram in ("a dog", "dog", "on the mat", "a dog on a"):
        assert scorer.document_frequency(gram) == images_with(gram) > 0
    assert scorer.document_frequency("quokka") == 0 and scorer.document_frequency("dog quokka") == 0
    one = scorer.score(["a dog on the grass"], [0])
    many = scorer.score(["a dog on the grass"] * 5 + ["a cat"], [0] * 5 + [1])
    np.testing.assert_allclose(many[:5], one[0], rtol=0, atol=0)


def test_normalisation_and_key_errors():
    scorer = CiderD({1: ["A dog, on the grass."], 2: ["a cat"]})
    np.testing.assert_allclose(scorer.score(["a DOG, on the grass!"], [1]), scorer.score(["a dog, on the grass"], [1]))
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(KeyError, match="key 3"):
        scorer.score(["a dog"], [3])
    with pytest.raises(ValueError, match="2 candidates but 1 keys"):
        scorer.score(["a", "b"], [1])
    with pytest.raises(ValueError, match=r"references\[5\]"):
        CiderD({5: []})
    with pytest.raises(TypeError, match="single str"):
        scorer.score("a dog", [1])


def test_disk_cache_round_trip_and_invalidation(tmp_path, caplog):
    caplog.set_level("INFO", logger="metrics.cider_d")
    annotation = tmp_path / "train.json"
    annotation.write_text('[{"image": "a_1.jpg", "caption": "x"}]')
    first = CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1 and file_sha256(annotation) in files[0].name
    assert "written to" in caplog.text and "loaded from" not in caplog.text
    second = CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")
    assert "loaded from" in caplog.text
    candidates, keys = [c for c, _ in CASES], [k for _, k in CASES]
    np.testing.assert_array_equal(first.score(candidates, keys), second.score(candidates, keys))
    for k in range(1, 5):
        np.testing.assert_array_equal(first.df[k], second.df[k])
    # same file hash but different references: the digest check rebuilds instead of reusing stale df
    changed = dict(REFS)
    changed[0] = ["completely new words here"]
    third = CiderD.from_annotation_files(changed, annotation, cache_dir=tmp_path / "cache")
    assert "other references; rebuilding" in caplog.text
    np.testing.assert_allclose(third.score(candidates, keys), naive_cider_d(changed, candidates, keys),
                               rtol=1e-12, atol=1e-12)
    # a corrupt cache file is rebuilt, not trusted
    files[0].write_bytes(b"not an npz")
    fourth = CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(fourth.score(candidates, keys), first.score(candidates, keys))


@pytest.mark.parametrize("damage", ["truncated", "empty", "damaged_member"])
def test_an_unreadable_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog, damage):
    """A cache cut short (a full disk, a killed job) made np.load raise zipfile.BadZipFile, which SCST training
    did not survive; every unreadable cache is rebuilt and rewritten instead."""
    annotation = tmp_path / "train.json"
    annotation.write_text('[{"image": "a_1.jpg", "caption": "x"}]')
    first = CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*.npz")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # same length, a stretch in the middle of the members overwritten
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
    caplog.set_level("INFO", logger="metrics.cider_d")
    rebuilt = CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"cannot read cache {path}" in w and "rebuilding it" in w for w in warnings), warnings
    candidates, keys = [c for c, _ in CASES], [k for _, k in CASES]
    np.testing.assert_array_equal(rebuilt.score(candidates, keys), first.score(candidates, keys))
    caplog.clear()
    CiderD.from_annotation_files(REFS, annotation, cache_dir=tmp_path / "cache")  # the rewritten cache loads
    assert "loaded from" in caplog.text and "cannot read" not in caplog.text


def test_hash_index_finds_every_code_and_nothing_else():
    from metrics.cider_d import _HashIndex

    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 10 ** 12, size=5000))
    index = _HashIndex(codes)
    np.testing.assert_array_equal(index.lookup(codes[::-1]), np.arange(len(codes))[::-1])
    absent = np.setdiff1d(rng.integers(0, 10 ** 12, size=5000), codes)
    assert (index.lookup(absent) == -1).all()
    # clustered codes (consecutive integers) collide in many slots and must still resolve
    dense = np.arange(100_000, 103_000, dtype=np.int64)
    np.testing.assert_array_equal(_HashIndex(dense).lookup(dense), np.arange(3000))
    assert (_HashIndex(np.zeros(0, dtype=np.int64)).lookup(dense) == -1).all()
