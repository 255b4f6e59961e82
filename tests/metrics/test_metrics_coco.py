"""metrics/coco.py: equal to pycocoevalcap's own COCOEvalCap, quiet, and usable without Java."""
import copy
import json
import logging

import pytest

import metrics.coco as coco
from metrics.coco import JAVA_FREE_KEYS, coco_caption_metrics, fallback_tokenize, java_available, ptb_tokenize
from metrics_fixtures import synthetic_coco

needs_java = pytest.mark.skipif(not java_available(), reason="Java runtime not installed")

# Caption-like text with the punctuation COCO annotators use, plus PTB's harder cases.
PTB_CASES = [
    "A man's dog, running (fast) on the grass.", "Don't look: it's a \"black-and-white\" photo!",
    "Two [red] {cars} & a bus; 3.5 meters... wow?", "the U.S. flag -- waving", "it is 10:30 a.m.",
    "e-mail me at x@y.com / now", "He said 'hello' and `bye`", "a cat isn't   here", "cats' toys",
    "I'm, you're, we've, they'll, he'd", "cannot gonna wanna", "50% off $5 #tag *star* ~tilde~",
    "a sentence ending with etc.", "Mr. Smith's car", "hello...world", "a -- b - c", "   leading and trailing   ",
    "", "dog.Cat", "1,000 people", "o'clock", "x+y=z", "A.B.C.", "a dog .", "a dog!!", "main st.",
    "Dr. Who is here", "cats vs. dogs", "the dog's.", "the u.s.a. flag", "ok.", "dogs,cats", "at&t store",
    "at 3pm.", "well.the end", "the 1st. place", "e.g. a dog", "i.e. cats", "tea/coffee", "it's 5 o'clock",
    "a dog ( left )", "dogs' bowls", "The 'big' dog", "a \"quoted\" word", "sheep, cows, and pigs.",
    "a man-made lake", "-a dash", "ends with dash-", "two dogs;one cat", "what?!", "a dog?", "no. 5 bus",
    "St. Louis", "A B C.", "Etc. etc.", "abc.def.", "x.y", "hello.", "Hello world.\tTab", "&amp; co",
    "can't won't shan't", "gimme lemme gotta", "the 1990's", "don't!", "what's up?", "$3.50", "3-4 people",
    "a 3:1 ratio", "a,b", "1, 2, 3", "5.", "2 p.m. ", "A/C unit", "#1 fan", "a*b", "50%", "a dog's ... tail",
    "a .. b", "a . b", "yes ' no", "`quote'", "''x''", "...", "line\nbreak",
    "A large jetliner sitting on top of an airport runway.", "Two giraffes standing next to each other in a field.",
    "A woman's hand holding a cell-phone (an iPhone).", 'A sign that says "STOP" on a pole.',
    "There are 3 dogs, 2 cats & 1 bird.", "A kitchen with a stove, sink, and refrigerator!",
    "A 10-year-old boy plays baseball.", "An old-fashioned clock reads 12:45 p.m.", "Café crème brûlée.",
]


def small_set():
    gt, results = synthetic_coco(12, seed=5)
    gt["annotations"].append({"image_id": 1, "id": 999, "caption": "A man's dog, running (fast) on the grass."})
    results[0]["caption"] = "a man's dog, running on the grass"
    return gt, results


def cocoevalcap_scores(gt, results, monkeypatch):
    """pycocoevalcap's own pipeline (COCO + loadRes + COCOEvalCap), SPICE stubbed (it downloads)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    gt_coco = COCO()
    gt_coco.dataset = copy.deepcopy(gt)
    gt_coco.createIndex()
    res_coco = gt_coco.loadRes(copy.deepcopy(results))
    evaluator = coco_eval.COCOEvalCap(gt_coco, res_coco)
    evaluator.params["image_id"] = res_coco.getImgIds()
    evaluator.evaluate()
    return {k: v for k, v in evaluator.eval.items() if k != "SPICE"}


@needs_java
def test_fallback_tokenizer_equals_stanford_ptb():
    java = ptb_tokenize(PTB_CASES)
    differences = [(c, j, fallback_tokenize(c)) for c, j in zip(PTB_CASES, java) if fallback_tokenize(c) != j]
    assert differences == []


def test_fallback_tokenizer_examples():
    assert fallback_tokenize("A man's dog, running (fast) on the grass.") == \
        "a man 's dog running -lrb- fast -rrb- on the grass"
    assert fallback_tokenize("Don't look: it's 10:30 a.m.!") == "do n't look it 's 10:30 a.m."
    assert fallback_tokenize("1,000 people... in the U.S.") == "1,000 people in the u.s."
    assert fallback_tokenize("") == ""


def test_java_available_false_without_java(monkeypatch):
    java_available.cache_clear()
    monkeypatch.setattr(coco.shutil, "which", lambda name: None)
    try:
        assert java_available() is False
    finally:
        java_available.cache_clear()


@pytest.mark.slow
@needs_java
def test_equals_cocoevalcap_and_is_quiet(monkeypatch, capfd):
    gt, results = small_set()
    got = coco_caption_metrics(results, gt)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # neither pycocoevalcap's prints nor Java's stderr
    assert set(got) == set(coco.COCO_KEYS)
    expected = cocoevalcap_scores(gt, results, monkeypatch)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_verbose_lets_pycocoevalcap_print(monkeypatch, capfd):
    monkeypatch.setattr(coco, "java_available", lambda: False)
    gt, results = small_set()
    coco_caption_metrics(results, gt, verbose=True)
    assert "ratio" in capfd.readouterr().out  # BLEU's own report


def test_without_java_scores_bleu_rouge_cider_with_fallback(monkeypatch, caplog):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gt, results = small_set()
    monkeypatch.setattr(coco, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="metrics.coco"):
        got = coco_caption_metrics(results, gt, spice=True)
    assert list(got) == list(JAVA_FREE_KEYS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Java was not found" in warnings[0] and "METEOR and SPICE skipped" in warnings[0]

    # naive composition: the fallback tokens fed to pycocoevalcap's scorers
    res = {r["image_id"]: [fallback_tokenize(r["caption"])] for r in results}
    gts = {i: [fallback_tokenize(a["caption"]) for a in gt["annotations"] if a["image_id"] == i] for i in res}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = dict(zip(coco.BLEU_KEYS, bleu), ROUGE_L=Rouge().compute_score(gts, res)[0],
                    CIDEr=Cider().compute_score(gts, res)[0])
    assert got == pytest.approx(expected, rel=1e-12)


def test_scores_intersection_and_rejects_bad_input(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(coco, "java_available", lambda: False)  # keeps this test Java-free and fast
    gt, results = small_set()
    baseline = coco_caption_metrics(results[:6], gt)
    with caplog.at_level(logging.WARNING, logger="metrics.coco"):
        assert coco_caption_metrics(results[:6] + [{"image_id": 777, "caption": "x"}], gt) == baseline
    assert any("777" in r.getMessage() and "not scored" in r.getMessage() for r in caplog.records)

    with pytest.raises(ValueError, match="image_id 1 more than once"):
        coco_caption_metrics(results + [{"image_id": 1, "caption": "another"}], gt)
    with pytest.raises(ValueError, match=r"results\[0\] needs"):
        coco_caption_metrics([{"image_id": 1}], gt)
    bare = copy.deepcopy(gt)
    bare["annotations"] = [a for a in bare["annotations"] if a["image_id"] != 2]
    with pytest.raises(ValueError, match=r"1 scored images have no reference caption \(first: \[2\]\)"):
        coco_caption_metrics(results, bare)

    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert coco_caption_metrics(results[:6], path) == baseline
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_caption_metrics(results, tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="gt.json is not valid JSON"):
        coco_caption_metrics(results, path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="gt.json: COCO caption ground truth needs a list under 'annotations'"):
        coco_caption_metrics(results, path)


@needs_java
def test_spice_failure_names_its_cause(monkeypatch):
    import pycocoevalcap.spice.spice as spice_module

    class FakeMeteor:  # METEOR is covered above; skip its slow JVM start here
        def compute_score(self, gts, res):
            return 0.5, []

        def close(self):
            pass

    class OfflineSpice:
        def __init__(self):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(coco, "MeteorScorer", FakeMeteor)
    monkeypatch.setattr(spice_module, "Spice", OfflineSpice)
    gt, results = small_set()
    with pytest.raises(RuntimeError, match="SPICE failed. It needs Stanford CoreNLP 3.6.0.*name resolution"):
        coco_caption_metrics(results, gt, spice=True)


# ---- METEOR: pycocoevalcap's jar, streamed and sharded ----------------------------------------------
def tokenised(gt, results):
    refs = coco.references_by_image(gt)
    tokens = coco.tokenize_texts([r["caption"] for r in results] + [c for rs in refs.values() for c in rs])
    res = {r["image_id"]: [tokens[r["caption"]]] for r in results}
    gts = {r["image_id"]: [tokens[c] for c in refs[r["image_id"]]] for r in results}
    return gts, res


@needs_java
def test_tokenising_in_any_grouping_gives_the_same_tokens():
    joint = ptb_tokenize(PTB_CASES)
    half = len(PTB_CASES) // 2
    apart = ptb_tokenize(PTB_CASES[half:]) + ptb_tokenize(PTB_CASES[:half])
    assert apart == joint[half:] + joint[:half]
    assert coco.tokenize_texts(PTB_CASES + PTB_CASES[:3]) == dict(zip(PTB_CASES, joint))


@pytest.mark.slow
@needs_java
def test_meteor_scorer_equals_pycocoevalcap_and_overlap_changes_nothing(monkeypatch):
    from pycocoevalcap.meteor.meteor import Meteor

    gt, results = synthetic_coco(40, seed=3)
    results[5]["caption"] = "a dog ||| with  pipes"  # pycocoevalcap's hypothesis clean-up applies
    gts, res = tokenised(gt, results)
    reference = Meteor()
    try:
        expected = reference.compute_score(gts, res)
    finally:
        del reference
    with coco.MeteorScorer(processes=2) as scorer:  # two shards of 20 images, two JVMs
        assert scorer.processes == 2
        assert scorer.compute_score(gts, res) == expected
        overlapped = coco_caption_metrics(results, gt, meteor=scorer)
        timings = {}
        sequential = coco_caption_metrics(results, gt, meteor=scorer, overlap=False, timings=timings)
    assert overlapped["METEOR"] == expected[0]
    assert sequential == overlapped
    assert set(timings) == {"coco_tokenize", "bleu", "meteor", "rouge", "cider"}
    with pytest.raises(RuntimeError, match="closed"):
        scorer.compute_score(gts, res)


@needs_java
def test_meteor_failure_names_the_command_and_stderr(monkeypatch):
    monkeypatch.setattr(coco, "METEOR_COMMAND", ("java", "-version"))  # prints to stderr and exits at once
    gts, res = {1: ["a dog"]}, {1: ["a cat"]}
    with coco.MeteorScorer(processes=1) as scorer:
        with pytest.raises(RuntimeError, match=r"METEOR \(java -version\) stopped after 0 of 1 replies.*version"):
            scorer.compute_score(gts, res)
    with pytest.raises(ValueError, match="same image ids"):
        coco.MeteorScorer.compute_score(scorer, {1: ["a"]}, {2: ["b"]})
