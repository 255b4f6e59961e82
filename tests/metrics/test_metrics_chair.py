"""metrics/chair.py: CHAIR against a hand-worked example, the reference code's word handling, and the CLI.

The hand-worked numbers below were counted by hand from the definition (LisaAnne/Hallucination utils/chair.py),
not produced by the implementation.
"""
import json
import logging

import pytest

from metrics.chair import (
    CHAIR_CORRECTED_KEYS,
    CHAIR_KEYS,
    SYNONYMS_PATH,
    caption_objects,
    chair_scores,
    gt_objects,
    pattern_singularize,
    read_coco_instances,
    read_synonyms,
    synonym_map,
    word_tokenize,
)

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 88, "name": "teddy bear"},
              {"id": 6, "name": "bus"}, {"id": 70, "name": "toilet"}, {"id": 62, "name": "chair"}]
INSTANCES = {
    "images": [{"id": i} for i in (1, 2, 3, 4, 5, 99)],
    "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 18},
                    {"image_id": 2, "category_id": 88}, {"image_id": 3, "category_id": 1},
                    {"image_id": 4, "category_id": 6}, {"image_id": 5, "category_id": 70}],
    "categories": CATEGORIES,
}
REFERENCES = {
    1: ["A puppy on a couch."],              # + dog (synonym), couch -> GT {dog, couch}
    2: ["a child holding a stuffed toy"],    # + person (child)       -> GT {teddy bear, person}
    3: ["A man eating a hot dog"],           # + person, hot dog      -> GT {person, hot dog}
    4: ["a large vehicle on the street"],    # nothing                -> GT {bus}
    5: ["the seat of the toilet is up"],     # toilet ("seat" dropped) -> GT {toilet}
}
RESULTS = {
    # dog (plural), cat, couch (sofa), dog again: 4 mentions, cat hallucinated
    1: "Two dogs and a cat sit on a sofa, next to another dog.",
    # teddy bear (not "bear"), chair hallucinated: 2 mentions, 1 hallucinated
    2: "a teddy bear sitting on a chair",
    # person (man), hot dog (not "dog"): 2 mentions, none hallucinated
    3: "a man eating hot dogs",
    # original: "bus" -> "bu" and "ties" -> "ty" never count; person hallucinated: 1 mention
    # corrected: bus (GT), person, tie (both hallucinated): 3 mentions
    4: "a bus and a man wearing ties",
    # no object: no mention, no hallucination
    5: "the sky is blue",
}
# Original: 9 mentions, 3 hallucinated, 3 of 5 captions; GT sizes 2+2+2+1+1 = 8, recalled 2+1+2+0+0 = 5.
HAND_ORIGINAL = {"CHAIR_s": 60.0, "CHAIR_i": 100 * 3 / 9, "chair_objects_per_caption": 9 / 5,
                 "chair_recall": 100 * 5 / 8}
# Corrected: 11 mentions, 4 hallucinated, 3 of 5 captions; recalled 2+1+2+1+0 = 6.
HAND_CORRECTED = {"CHAIR_s_corrected": 60.0, "CHAIR_i_corrected": 100 * 4 / 11,
                  "chair_objects_per_caption_corrected": 11 / 5, "chair_recall_corrected": 100 * 6 / 8}


def instance_names():
    names = {c["id"]: c["name"] for c in CATEGORIES}
    objects = {image["id"]: set() for image in INSTANCES["images"]}
    for ann in INSTANCES["annotations"]:
        objects[ann["image_id"]].add(names[ann["category_id"]])
    return objects


def test_hand_worked_example_original():
    assert chair_scores(RESULTS, REFERENCES, instance_names()) == pytest.approx(HAND_ORIGINAL)


def test_hand_worked_example_corrected():
    assert chair_scores(RESULTS, REFERENCES, instance_names(), variant="corrected") == pytest.approx(HAND_CORRECTED)
    assert tuple(HAND_CORRECTED) == CHAIR_CORRECTED_KEYS and tuple(HAND_ORIGINAL) == CHAIR_KEYS


def test_gt_is_instances_plus_reference_mentions():
    objects = instance_names()
    assert gt_objects(REFERENCES[1], objects[1]) == {"dog", "couch"}
    assert gt_objects(REFERENCES[5], objects[5]) == {"toilet"}
    with pytest.raises(ValueError, match="'unicorn' is not in the CHAIR synonym list"):
        gt_objects([], ["unicorn"])


@pytest.mark.parametrize("caption, words, categories", [
    ("Two puppies and a dog.", ["puppy", "dog"], ["dog", "dog"]),
    ("hot dogs and a teddy bear", ["hot dog", "teddy bear"], ["hot dog", "teddy bear"]),
    ("a baby elephant near an adult giraffe", ["elephant", "giraffe"], ["elephant", "giraffe"]),
    ("a passenger train", ["train"], ["train"]),         # "passenger" is not a person here
    ("a passenger on a train", ["passenger", "train"], ["person", "train"]),
    ("a man with a bow tie", ["man", "tie"], ["person", "tie"]),
    ("the seat of the toilet", ["toilet"], ["toilet"]),  # no chair
    ("a toilet seat", ["toilet"], ["toilet"]),
    ("a chair with a seat", ["chair", "seat"], ["chair", "chair"]),
    ("two wine glasses and a wine glass", ["wine glass", "wine glass"], ["wine glass", "wine glass"]),
    ("a train on train tracks", ["train"], ["train"]),   # "train track" is a phrase, not a train
    ("people and women and children", ["person", "woman", "child"], ["person"] * 3),
    ("a red motor bike", [], []),                        # " motor bike" (leading space) never matches
    ("a cheesecake", [], []),                            # " cheesecake" likewise
    ("a bus near two buses", ["bus"], ["bus"]),          # pattern: bus -> "bu", buses -> bus
    ("doggies and collies", [], []),                     # pattern's -ie list returns the plural unchanged
    ("a man's dog, isn't it?", ["man", "dog"], ["person", "dog"]),
    ("", [], []),
])
def test_caption_objects_follow_the_reference_code(caption, words, categories):
    assert caption_objects(caption) == (words, categories)


def test_corrected_variant_fixes_the_quirks():
    assert caption_objects("a bus and ties", "corrected")[1] == ["bus", "tie"]
    assert caption_objects("a red motor bike and a cheesecake", "corrected")[1] == ["motorcycle", "cake"]
    assert caption_objects("doggies and an iphone", "corrected")[1] == ["dog", "cell phone"]
    with pytest.raises(ValueError, match="variant"):
        caption_objects("a dog", "fixed")


@pytest.mark.parametrize("word, singular", [
    ("dogs", "dog"), ("puppies", "puppy"), ("buses", "bus"), ("bus", "bu"), ("ties", "ty"), ("glass", "glas"),
    ("glasses", "glass"), ("knives", "knife"), ("mice", "mouse"), ("geese", "goose"), ("oxen", "ox"),
    ("women", "woman"), ("sheep", "sheep"), ("scissors", "scissors"), ("is", "is"), ("this", "thi"),
    ("benches", "bench"), ("tomatoes", "tomato"), ("luggage", "luggage"), ("bases", "basis"), ("wolves", "wolf"),
    ("doggies", "doggies"), ("dogs'", "dog's"), ("mothers-in-law", "mother-in-law"), ("flour", "flmy"),
])
def test_pattern_singularize(word, singular):
    assert pattern_singularize(word) == singular


def test_every_synonym_and_its_plural_singularises_to_a_known_form():
    # The vocabulary's single words: the regular "-s" plural of each comes back to the word itself, except where
    # pattern's own rules say otherwise (these are what pattern 3.6 gives; see the module docstring).
    exceptions = {"bus": "bu", "minibus": "minibu", "airbus": "airbu", "skis": "ski", "people": "person",
                  "children": "child", "oxen": "ox"}
    for word in synonym_map():
        if " " in word or not word.isalpha() or not word.islower():
            continue
        assert pattern_singularize(word) == exceptions.get(word, word), word


@pytest.mark.parametrize("text, tokens", [
    ("a dog's bone, and a cat.", ["a", "dog", "'s", "bone", ",", "and", "a", "cat", "."]),
    ("a bed. a cat.", ["a", "bed", ".", "a", "cat", "."]),
    ('a man (with a hat) isn\'t "happy"!', ["a", "man", "(", "with", "a", "hat", ")", "is", "n't", "``", "happy",
                                            "''", "!"]),
    ("a puppy -- dogs; cannot", ["a", "puppy", "--", "dogs", ";", "can", "not"]),
    ("a hot-dog / 1,000 dogs...", ["a", "hot-dog", "/", "1,000", "dogs", "..."]),
])
def test_word_tokenize_like_nltk(text, tokens):
    assert word_tokenize(text) == tokens


def test_synonym_file_keeps_the_original_entries():
    lines = read_synonyms()
    assert len(lines) == 80 and SYNONYMS_PATH.parent.name == "data"
    by_category = {line[0]: line for line in lines}
    assert " motor bike" in by_category["motorcycle"] and " cheesecake" in by_category["cake"]
    assert by_category["person"].count("woman") == 2  # duplicates kept as in the original
    assert synonym_map()["puppy"] == "dog" and synonym_map()["hot dog"] == "hot dog"


def test_read_coco_instances_and_its_errors(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(INSTANCES))
    assert read_coco_instances(path) == instance_names()
    assert read_coco_instances(path)[99] == set()  # listed image without annotations
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        read_coco_instances(bad)
    with pytest.raises(FileNotFoundError, match="COCO instances file not found"):
        read_coco_instances(tmp_path / "missing.json")
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="bad.json: needs a list under 'categories'"):
        read_coco_instances(bad)
    bad.write_text(json.dumps({**INSTANCES, "annotations": [{"image_id": 1, "category_id": 7}]}))
    with pytest.raises(ValueError, match="category_id 7"):
        read_coco_instances(bad)
    bad.write_text(json.dumps({**INSTANCES, "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] needs 'image_id' and 'category_id'"):
        read_coco_instances(bad)


def test_images_outside_the_instances_file(caplog):
    with pytest.raises(ValueError, match="none of the 1 scored images is in the instances file"):
        chair_scores({"7": "a dog"}, {}, instance_names(), source="inst.json")
    with caplog.at_level(logging.WARNING):
        scores = chair_scores({1: "a dog", 7: "a cat"}, {7: ["a cat"]}, instance_names())
    assert "1 of 2 scored images are not in the instances file" in caplog.text
    assert scores["CHAIR_s"] == 0.0 and scores["CHAIR_i"] == 0.0


def test_no_mention_at_all_scores_zero():
    scores = chair_scores({1: "the sky is blue"}, {}, instance_names())
    assert scores == {"CHAIR_s": 0.0, "CHAIR_i": 0.0, "chair_objects_per_caption": 0.0, "chair_recall": 0.0}


# ---------------------------------------------------------------------------------------------
# Suite and CLI
# ---------------------------------------------------------------------------------------------
def write_inputs(tmp_path):
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in RESULTS],
          "annotations": [{"image_id": i, "id": n, "caption": c}
                          for n, (i, refs) in enumerate(REFERENCES.items()) for c in refs]}
    paths = {name: tmp_path / f"{name}.json" for name in ("R", "GT", "INST")}
    paths["R"].write_text(json.dumps([{"image_id": i, "caption": c} for i, c in RESULTS.items()]))
    paths["GT"].write_text(json.dumps(gt))
    paths["INST"].write_text(json.dumps(INSTANCES))
    return paths


def test_cli_writes_chair_into_out(tmp_path):
    import eval_caption

    paths = write_inputs(tmp_path)
    out = tmp_path / "M.json"
    eval_caption.main(["--results", str(paths["R"]), "--annotations", str(paths["GT"]), "--metrics", "chair",
                       "--instances", str(paths["INST"]), "--out", str(out),
                       "--length-plot", str(tmp_path / "lengths.png")])
    metrics = json.loads(out.read_text())
    assert {k: metrics[k] for k in CHAIR_KEYS} == pytest.approx(HAND_ORIGINAL)
    assert metrics["num_images"] == 5


def test_suite_groups_and_instances_policy(tmp_path, caplog):
    from metrics.suite import compute_metrics, markdown_table

    paths = write_inputs(tmp_path)
    results = json.loads(paths["R"].read_text())
    both = compute_metrics(results, paths["GT"], metrics=["chair", "chair_corrected"], instances=paths["INST"])
    assert {k: both[k] for k in CHAIR_KEYS} == pytest.approx(HAND_ORIGINAL)
    assert {k: both[k] for k in CHAIR_CORRECTED_KEYS} == pytest.approx(HAND_CORRECTED)
    loaded = compute_metrics(results, paths["GT"], metrics=["chair"], instances=read_coco_instances(paths["INST"]))
    assert loaded["CHAIR_i"] == pytest.approx(HAND_ORIGINAL["CHAIR_i"])
    with pytest.raises(ValueError, match=r"need COCO instance annotations: pass instances \(--instances"):
        compute_metrics(results, paths["GT"], metrics=["chair"])
    with pytest.raises(FileNotFoundError, match="COCO instances file not found"):
        compute_metrics(results, paths["GT"], metrics=["chair"], instances=tmp_path / "nope.json")
    with caplog.at_level(logging.WARNING):
        skipped = compute_metrics(results, paths["GT"], metrics=["length", "chair"], instances=tmp_path / "nope.json",
                                  skip_missing_instances=True)
    assert "nope.json not found" in caplog.text
    assert all(skipped[k] is None for k in CHAIR_KEYS) and skipped["cap_len"] > 0
    table = markdown_table([("with", both), ("without", skipped)])
    header, _, with_row, without_row = table.splitlines()
    assert header.endswith("| CHAIR_s | CHAIR_i |")
    assert with_row.endswith("| 60.0 | 33.3 |") and without_row.endswith("| - | - |")
    assert "CHAIR" not in markdown_table([("plain", skipped)])


def test_prepare_data_says_where_the_instances_go(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data_for_chair", script)
    prepare_data = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, prepare_data)  # its dataclasses look their module up there
    spec.loader.exec_module(prepare_data)
    assert prepare_data.report_coco_instances(tmp_path) is False
    assert f"{tmp_path / 'instances_val2014.json'}: MISSING" in capsys.readouterr().out
    (tmp_path / "instances_val2014.json").write_text(json.dumps(INSTANCES))
    assert prepare_data.report_coco_instances(tmp_path) is True
    assert "instances_val2014.json: present" in capsys.readouterr().out
