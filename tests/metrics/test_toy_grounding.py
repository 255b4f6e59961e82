"""Tests for metrics/toy_grounding.py: the toy grammar parser, the grounding numbers, the suite group."""
import json

import pytest

from data import toy
from metrics.suite import METRIC_KEYS, compute_metrics
from metrics.toy_grounding import TOY_ATTRIBUTES, TOY_GROUNDING_KEYS, ToyGrammarParser, scenes_from_gt, \
    toy_grounding

GRAMMAR = toy.toy_grammar()
RED_CIRCLE = {"colour": "red", "shape": "circle", "size": "large", "position": "left", "background": "white"}
WHITE_ON_BLACK = {"colour": "white", "shape": "star", "size": "small", "position": "middle", "background": "black"}


def test_attributes_agree_with_the_generator():
    assert TOY_ATTRIBUTES == toy.ATTRIBUTES == tuple(GRAMMAR)
    assert METRIC_KEYS["toy_grounding"] == TOY_GROUNDING_KEYS


@pytest.mark.parametrize("caption, expected", [
    ("a large red circle to the left on a white background",
     {"size": {"large"}, "colour": {"red"}, "shape": {"circle"}, "position": {"left"}, "background": {"white"}}),
    # The background colour is read inside its phrase, not as the shape's colour.
    ("a white star on a black background", {"colour": {"white"}, "shape": {"star"}, "background": {"black"}}),
    ("a black star on a white background", {"colour": {"black"}, "shape": {"star"}, "background": {"white"}}),
    ("white background", {"background": {"white"}}),
    # Case and punctuation do not matter; words are matched whole.
    ("A Red circle, to the LEFT.", {"colour": {"red"}, "shape": {"circle"}, "position": {"left"}}),
    ("redder circles in the middleground", {}),
    # A position in a form the references never use still names it; two colours are both read.
    ("a red circle to the middle", {"colour": {"red"}, "shape": {"circle"}, "position": {"middle"}}),
    ("a red blue circle", {"colour": {"red", "blue"}, "shape": {"circle"}}),
    ("", {}),
])
def test_parser_reads_each_attribute(caption, expected):
    assert ToyGrammarParser(GRAMMAR).mentions(caption) == expected


def test_all_right_terse_and_each_attribute_wrong():
    right = "a large red circle to the left on a white background"
    wrong = {
        "colour": "a blue circle",
        "shape": "a red square",
        "size": "a small red circle",
        "position": "a red circle to the right",
        "background": "a red circle on a black background",
    }
    assert toy_grounding([right], [RED_CIRCLE], GRAMMAR) == {
        "ground_colour_shape": 100.0, "ground_any_wrong": 0.0,
        **{f"ground_{a}_{k}": 100.0 for a in TOY_ATTRIBUTES for k in ("mentioned", "precision")}}
    terse = toy_grounding(["a red circle"], [RED_CIRCLE], GRAMMAR)
    assert terse["ground_colour_shape"] == 100.0 and terse["ground_any_wrong"] == 0.0
    assert terse["ground_size_mentioned"] == 0.0 and terse["ground_size_precision"] is None
    for attribute, caption in wrong.items():
        scores = toy_grounding([caption], [RED_CIRCLE], GRAMMAR)
        assert scores["ground_any_wrong"] == 100.0, caption
        assert scores[f"ground_{attribute}_mentioned"] == 100.0, caption
        assert scores[f"ground_{attribute}_precision"] == 0.0, caption
        others = [a for a in TOY_ATTRIBUTES if a != attribute and scores[f"ground_{a}_mentioned"]]
        assert all(scores[f"ground_{a}_precision"] == 100.0 for a in others), caption
        assert scores["ground_colour_shape"] == (0.0 if attribute in ("colour", "shape") else 100.0), caption


def test_counts_over_several_captions():
    captions = [
        "a white star in the middle on a black background",  # all right
        "a black star on a white background",  # colour and background wrong
        "a white star to the middle",  # right ("to the middle" names middle)
        "a white black star",  # two colours: the colour mention is wrong
        "a small star",  # no colour: not colour+shape, nothing wrong
    ]
    scores = toy_grounding(captions, [WHITE_ON_BLACK] * 5, GRAMMAR)
    assert scores["ground_colour_shape"] == pytest.approx(100 * 2 / 5)
    assert scores["ground_any_wrong"] == pytest.approx(100 * 2 / 5)
    assert scores["ground_colour_mentioned"] == pytest.approx(100 * 4 / 5)
    assert scores["ground_colour_precision"] == pytest.approx(100 * 2 / 4)
    assert scores["ground_shape_precision"] == 100.0 and scores["ground_shape_mentioned"] == 100.0
    assert scores["ground_background_mentioned"] == pytest.approx(100 * 2 / 5)
    assert scores["ground_background_precision"] == pytest.approx(50.0)
    assert scores["ground_position_mentioned"] == pytest.approx(100 * 2 / 5)
    assert scores["ground_position_precision"] == 100.0
    assert scores["ground_size_mentioned"] == pytest.approx(20.0) and scores["ground_size_precision"] == 100.0
    assert list(scores) == list(TOY_GROUNDING_KEYS)


def test_bad_grammar_and_scenes_are_named():
    with pytest.raises(ValueError, match="lacks attributes \\['size'\\]"):
        ToyGrammarParser({a: v for a, v in GRAMMAR.items() if a != "size"})
    with pytest.raises(ValueError, match="names both"):
        ToyGrammarParser({**GRAMMAR, "size": {"small": ["small"], "large": ["red"]}})
    with pytest.raises(ValueError, match="non-empty list"):
        ToyGrammarParser({**GRAMMAR, "size": {"small": "small"}})
    with pytest.raises(ValueError, match="scene 0 .*\\['shape'\\]"):
        toy_grounding(["a red circle"], [{**RED_CIRCLE, "shape": "hexagon"}], GRAMMAR)
    with pytest.raises(ValueError, match="1 captions but 2 scenes"):
        toy_grounding(["a red circle"], [RED_CIRCLE] * 2, GRAMMAR)


def _toy_gt(tmp_path):
    paths = toy.ensure_toy_dataset(tmp_path / "toy", num_train=2, num_val=2, num_test=6, seed=1)
    return paths, json.loads(paths["test_gt"].read_text())


def test_toy_gt_files_carry_scenes_and_the_references_are_exactly_right(tmp_path):
    paths, gt = _toy_gt(tmp_path)
    assert gt["toy_grammar"] == GRAMMAR
    test_entries = json.loads(paths["test_file"].read_text())
    assert [e["toy_scene"] for e in test_entries] == [image["toy_scene"] for image in gt["images"]]
    ids = [image["id"] for image in gt["images"]]
    refs = {i: [a["caption"] for a in gt["annotations"] if a["image_id"] == i] for i in ids}
    scenes, grammar = scenes_from_gt(gt, ids)
    for k in range(toy.NUM_REFERENCES):  # every reference the generator writes is parsed as exactly right
        scores = toy_grounding([refs[i][k] for i in ids], scenes, grammar)
        assert scores["ground_colour_shape"] == 100.0 and scores["ground_any_wrong"] == 0.0
        assert all(scores[f"ground_{a}_precision"] in (100.0, None) for a in TOY_ATTRIBUTES)
    detailed = toy_grounding([max(refs[i], key=len) for i in ids], scenes, grammar)
    assert all(detailed[f"ground_{a}_mentioned"] == 100.0 for a in TOY_ATTRIBUTES)


def test_suite_group_and_its_errors(tmp_path):
    _, gt = _toy_gt(tmp_path)
    scene = gt["images"][0]["toy_scene"]
    # Right about the first image, wrong about the shape of the second.
    second = gt["images"][1]["toy_scene"]
    wrong_shape = next(s for s in toy.SHAPES if s != second["shape"])
    results = [{"image_id": gt["images"][0]["id"], "caption": f"a {scene['colour']} {scene['shape']}"},
               {"image_id": gt["images"][1]["id"], "caption": f"a {second['colour']} {wrong_shape}"}]
    scores = compute_metrics(results, gt, metrics=["length", "toy_grounding"])
    assert scores["num_images"] == 2 and scores["num_missing"] == 4
    assert scores["ground_colour_shape"] == 50.0 and scores["ground_shape_precision"] == 50.0
    assert list(scores)[3:] == list(TOY_GROUNDING_KEYS)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({k: v for k, v in gt.items() if k != "toy_grammar"}))
    with pytest.raises(ValueError, match=f"{path}: .*no 'toy_grammar'"):
        compute_metrics(results, path, metrics=["toy_grounding"])
    del gt["images"][1]["toy_scene"]
    with pytest.raises(ValueError, match=f"1 scored images have none \\(first ids: \\[{gt['images'][1]['id']}\\]"):
        compute_metrics(results, gt, metrics=["toy_grounding"])


def test_table_gets_the_grounding_columns_only_when_a_run_has_them():
    from metrics.suite import markdown_table

    terse = {"cap_len": 3.0, **toy_grounding(["a red circle"], [RED_CIRCLE], GRAMMAR)}
    detailed = {"cap_len": 9.0, **toy_grounding(["a small red circle to the left on a white background"],
                                                 [RED_CIRCLE], GRAMMAR)}
    table = markdown_table([("MLE", terse), ("SMILE", detailed), ("other", {"cap_len": 3.0})]).splitlines()
    assert table[0].endswith("| Colour+shape right | Any attr. wrong | Colour P | Shape P | Size M | Size P | Pos. M "
                             "| Pos. P | BG M | BG P |")
    assert table[2].endswith("| 100.0 | 0.0 | 100.0 | 100.0 | 0.0 | - | 0.0 | - | 0.0 | - |")
    assert table[3].endswith("| 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 0.0 | 100.0 | 100.0 | 100.0 | 100.0 |")
    assert table[4].endswith("| - | - | - | - | - | - | - | - | - | - |")
    assert "Colour+shape" not in markdown_table([("other", {"cap_len": 3.0})])
