"""metrics/registry.py: every registered group writes exactly the keys it declares, runs on what it declares it
needs, and the names derived from the registry (groups, keys, table columns, model checks) agree with it."""
import dataclasses
import json

import pytest

import metrics.coco as coco
from data import toy
from metrics.registry import ALL_METRICS, COUNT_KEYS, DEFAULT_METRICS, IMAGE_METRICS, KEY_DIRECTIONS, METRIC_GROUPS, \
    METRIC_KEYS, NEEDS, check_groups, groups_needing, needs_of, reported_groups
from metrics.suite import MetricOptions, compute_metrics, metric_options
from metrics.table import OPTIONAL_COLUMNS, TABLE_COLUMNS
from metrics_fixtures import make_images


GRAMMAR = toy.toy_grammar()
SCENES = [
    {"colour": "red", "shape": "circle", "size": "large", "position": "left", "background": "white"},
    {"colour": "blue", "shape": "star", "size": "small", "position": "middle", "background": "black"},
    {"colour": "green", "shape": "square", "size": "large", "position": "top", "background": "grey"},
]
CAPTIONS = ["a large red circle to the left on a white background next to a dog",
            "a small blue triangle in the middle on a black background with a man",
            "a green square"]
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def _phrase(attribute: str, value: str) -> str:
    return GRAMMAR[attribute][value][0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir):
    """Three images with every input some group needs: files, references, toy scenes and grammar, COCO instances,
    a FineCapEval CSV; the options for each need."""
    root = tmp_path_factory.mktemp("registry")
    names = make_images(root / "images", len(SCENES), seed=2)
    images, annotations = [], []
    for index, (name, scene) in enumerate(zip(names, SCENES), start=1):
        images.append({"id": index, "file_name": name, "toy_scene": scene})
        described = " ".join(_phrase(a, scene[a]) for a in ("size", "colour", "shape", "position", "background"))
        for reference in (f"a {described}", f"a {scene['colour']} {scene['shape']} beside a dog and a person"):
            annotations.append({"id": len(annotations) + 1, "image_id": index, "caption": reference})
    gt = {"images": images, "annotations": annotations, "toy_grammar": GRAMMAR}
    instances = {"images": [{"id": image["id"]} for image in images], "categories": CATEGORIES,
                 "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 1}]}
    (root / "instances.json").write_text(json.dumps(instances))
    rows = ["image,caption,background,object,relation"]
    rows += [f"{name},a {s['colour']} {s['shape']},{_phrase('background', s['background'])},"
             f"a {s['colour']} {s['shape']}\\;a dog,{_phrase('position', s['position'])}"
             for name, s in zip(names, SCENES)]
    (root / "FineCapEval.csv").write_text("\n".join(rows) + "\n")
    results = [{"image_id": image["id"], "caption": caption} for image, caption in zip(images, CAPTIONS)]
    by_need = {"images": {"images_root": root / "images"}, "clip": {"clip_model": tiny_clip_dir},
               "lm": {"ppl_model": tiny_gpt2_dir}, "instances": {"instances": root / "instances.json"},
               "finecapeval": {"finecapeval": root / "FineCapEval.csv"}}
    return gt, results, by_need


@pytest.fixture()
def recorded(monkeypatch):
    """What each group's compute function returned during the test: ``{group: keys}``. SPICE is stubbed: its
    first use downloads Stanford CoreNLP; the stub still runs the coco group's SPICE path and key."""
    import pycocoevalcap.spice.spice as spice_module

    class OfflineSpice:
        def compute_score(self, gts, res):
            return 0.25, [0.25] * len(res)

    monkeypatch.setattr(spice_module, "Spice", OfflineSpice)
    written: dict[str, list[str]] = {}
    for name, group in METRIC_GROUPS.items():
        if group.compute is not None:
            def record(ctx, _compute=group.compute, _name=name):
                out = _compute(ctx)
                written[_name] = list(out)
                return out

            monkeypatch.setitem(METRIC_GROUPS, name, dataclasses.replace(group, compute=record))
    return written


@pytest.mark.parametrize("name", ALL_METRICS)
def test_each_group_writes_exactly_the_keys_it_declares(name, inputs, recorded):
    """Run alone, with only the options of its declared needs: the output has the counts and the keys of the
    group (and of what it includes), in registry order, and its compute functions wrote exactly those keys."""
    gt, results, by_need = inputs
    group = METRIC_GROUPS[name]
    options = MetricOptions(progress=False, num_workers=0)
    for need in needs_of([name]):
        options = metric_options(options, **by_need.get(need, {}))
    scores = compute_metrics(results, gt, [name], options)

    reported = reported_groups([name])
    declared = [key for group_name in ALL_METRICS if group_name in reported for key in METRIC_KEYS[group_name]]
    assert list(scores) == [*COUNT_KEYS, *declared]
    assert scores["num_images"] == len(results) and scores["num_missing"] == 0
    written = [key for keys in recorded.values() for key in keys]
    assert sorted(written) == sorted(declared), f"{name}: written {written}, declared {declared}"
    if group.compute is not None:
        assert set(METRIC_KEYS[name]) <= set(recorded[name])
    for key in declared:
        value = scores[key]
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), (key, value)
        if key == "METEOR" and coco.java_available():
            assert value is not None  # None only where Java is missing
        if key.startswith("ground_") and key.endswith("_precision"):
            continue  # None when no caption mentions the attribute
        assert value is not None or key == "METEOR", key


def test_derived_names_follow_the_registry():
    assert ALL_METRICS == tuple(METRIC_GROUPS) and ALL_METRICS[:2] == ("coco", "spice")
    assert DEFAULT_METRICS == ("coco", "length", "diversity", "retrieval", "clipscore", "ppl")
    assert IMAGE_METRICS == {"retrieval", "clipscore"} == groups_needing("images")
    assert {need for group in METRIC_GROUPS.values() for need in group.needs} <= set(NEEDS)
    assert set(KEY_DIRECTIONS) == {key for keys in METRIC_KEYS.values() for key in keys}
    assert KEY_DIRECTIONS["PPL"] == KEY_DIRECTIONS["CHAIR_s"] == "lower" and KEY_DIRECTIONS["CIDEr"] == "higher"
    assert KEY_DIRECTIONS["cap_len"] is None and KEY_DIRECTIONS["retrieval_pool"] is None
    assert reported_groups(["finecapeval"]) == {"finecapeval", "coco"} == reported_groups(["finecapeval", "coco"])
    assert needs_of(["spice"]) == {"references"}
    keys = {key for keys in METRIC_KEYS.values() for key in keys}
    assert {key for _, key, _, _ in TABLE_COLUMNS + OPTIONAL_COLUMNS if key is not None} <= keys
    assert [header for header, *_ in TABLE_COLUMNS] == ["Cap. Len.", "Lex. Div.", "R@1", "R@5", "CLIPScore", "PPL",
                                                       "BLEU-4", "CIDEr"]


def test_group_names_and_options_are_checked():
    with pytest.raises(ValueError, match=r"--metrics: unknown metric groups \['bleu'\]; valid: \['coco', 'spice'"):
        check_groups(["coco", "bleu"], what="--metrics")
    with pytest.raises(ValueError, match="no metric group requested"):
        check_groups([])
    assert check_groups(None) == set(DEFAULT_METRICS) and check_groups("ppl") == {"ppl"}
    with pytest.raises(TypeError, match=r"unknown metric options \['image_root'\]; MetricOptions has \['images_root'"):
        metric_options(image_root="x")
    options = MetricOptions(batch_size=8)
    assert metric_options(options, overlap=False) == MetricOptions(batch_size=8, overlap=False)
    assert metric_options(options) is options


def test_model_checks_come_from_the_needs():
    import training

    sources = training.metric_model_sources(["clipscore", "length"], "clip-dir", "gpt2-dir")
    assert sources == [("eval.clip_model", "clip-dir")]
    assert training.metric_model_sources(None, "c", "g") == [("eval.clip_model", "c"), ("eval.ppl_model", "g")]
    assert training.metric_model_sources((), "c", "g") == []
    with pytest.raises(ValueError, match=r"eval.metrics: unknown metric groups \['clip'\]"):
        training.metric_model_sources(["clip"], "c", "g")
