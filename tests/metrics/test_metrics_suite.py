"""metrics/suite.py: the whole suite equals its parts, results-vs-GT policy, output, markdown table."""
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metrics.coco as coco
from metrics import (
    ALL_METRICS,
    METRIC_KEYS,
    caption_length,
    coco_caption_metrics,
    compute_metrics,
    gpt2_perplexity,
    lexical_diversity,
    markdown_header,
    markdown_row,
    ref_clip_score,
    score_results_file,
    self_retrieval,
)
from metrics.suite import COUNT_KEYS, DEFAULT_METRICS
from metrics_fixtures import make_images, synthetic_coco


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 images on disk, COCO GT and results files."""
    root = tmp_path_factory.mktemp("suite")
    names = make_images(root / "images", 10, seed=4)
    gt, results = synthetic_coco(10, file_names=names, seed=8)
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "results.json").write_text(json.dumps(results))
    return root, gt, results


@pytest.fixture(scope="module")
def models(tiny_clip_dir, tiny_gpt2_dir):
    return dict(clip_model=tiny_clip_dir, ppl_model=tiny_gpt2_dir, progress=False)


@pytest.fixture(scope="module")
def full_run(dataset, models, tmp_path_factory):
    """score_results_file over every default group, on CPU (device=None: no GPU here), with Java if present."""
    root, _, _ = dataset
    out = tmp_path_factory.mktemp("out") / "sub" / "metrics.json"
    timings = {}
    scores = score_results_file(root / "results.json", root / "gt.json", images_root=root / "images", out=out,
                                timings=timings, **models)
    return scores, out, timings


def expected_keys(groups):
    keys = list(COUNT_KEYS)
    for group in ALL_METRICS:
        if group in groups:
            keys += METRIC_KEYS[group]
    return keys


@pytest.mark.slow
def test_full_suite_equals_its_parts(full_run, dataset, models):
    scores, out, timings = full_run
    root, gt, results = dataset
    captions = [r["caption"] for r in results]
    paths = [root / "images" / image["file_name"] for image in gt["images"]]
    refs = [[a["caption"] for a in gt["annotations"] if a["image_id"] == image["id"]] for image in gt["images"]]

    assert list(scores) == expected_keys(DEFAULT_METRICS)
    assert scores["num_images"] == 10 and scores["num_missing"] == 0
    coco_scores = coco_caption_metrics(results, gt)
    assert {k: scores[k] for k in coco_scores} == coco_scores
    if not coco.java_available():
        assert scores["METEOR"] is None
    assert scores["cap_len"] == caption_length(captions)
    assert {k: scores[k] for k in METRIC_KEYS["diversity"]} == lexical_diversity(captions)
    retrieval = self_retrieval(captions, paths, models["clip_model"], progress=False, num_workers=0)
    assert {k: scores[k] for k in METRIC_KEYS["retrieval"]} == pytest.approx(retrieval, abs=1e-9)
    assert scores["retrieval_pool"] == 10
    clip = ref_clip_score(captions, refs, paths, models["clip_model"], progress=False, num_workers=0)
    assert scores["CLIPScore"] == pytest.approx(clip["CLIPScore"], abs=1e-4)
    assert scores["RefCLIPScore"] == pytest.approx(clip["RefCLIPScore"], abs=1e-4)
    assert scores["PPL"] == pytest.approx(gpt2_perplexity(captions, models["ppl_model"]), rel=1e-6)

    assert json.loads(out.read_text()) == scores
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind
    assert set(timings) == {"coco", "coco_tokenize", "bleu", "rouge", "cider", "length", "diversity", "clip_load",
                            "clip_images", "clip_texts", "retrieval", "clipscore", "ppl_load", "ppl"} | \
        ({"meteor"} if coco.java_available() else set())


def test_without_java_scores_the_java_free_metrics(full_run, dataset, models, monkeypatch, caplog):
    root, _, _ = dataset
    monkeypatch.setattr(coco, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        scores = score_results_file(root / "results.json", root / "gt.json", images_root=root / "images",
                                    metrics=["coco", "length", "ppl"], **models)
    assert list(scores) == expected_keys({"coco", "length", "ppl"})
    assert scores["METEOR"] is None
    assert sum("Java was not found" in r.getMessage() and "METEOR skipped" in r.getMessage()
               for r in caplog.records) == 1
    java_run = full_run[0]
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "cap_len", "PPL"):
        # the fallback tokenizer gives the jar's tokens on these captions, so nothing else moves
        assert scores[key] == pytest.approx(java_run[key], rel=1e-9), key


def test_extra_distractors_enlarge_the_pool(dataset, models, tmp_path):
    root, gt, results = dataset
    extra = tmp_path / "distractors"
    make_images(extra, 7, seed=11, prefix="d")
    scores = compute_metrics(results, gt, metrics=["retrieval"], images_root=root / "images",
                             extra_pool_images=extra, **models)
    assert scores["retrieval_pool"] == 17
    assert list(scores) == expected_keys({"retrieval"})


# ---- results vs ground truth -----------------------------------------------------------------------
def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_duplicates(dataset, tmp_path, caplog):
    root, _, results = dataset
    clash = write(tmp_path / "clash.json", results + [{"image_id": 3, "caption": "something else"},
                                                      {"image_id": 5, "caption": "and another"}])
    with pytest.raises(ValueError, match=r"clash.json: 2 image ids have more than one, different caption "
                                         r"\(first: \[3, 5\]\)"):
        score_results_file(clash, root / "gt.json", metrics=["length"])

    repeated = write(tmp_path / "repeated.json", results + results[:2])
    with caplog.at_level(logging.WARNING, logger="metrics.suite"):
        scores = score_results_file(repeated, root / "gt.json", metrics=["length"])
    assert scores["num_images"] == 10
    assert scores["cap_len"] == caption_length([r["caption"] for r in results])
    assert any("repeated.json: 2 image ids appear more than once with the same caption" in r.getMessage()
               and "[1, 2]" in r.getMessage() for r in caplog.records)


def test_ids_not_in_ground_truth_are_an_error(dataset, tmp_path):
    root, _, results = dataset
    extra = write(tmp_path / "extra.json", results + [{"image_id": 404, "caption": "a dog"}])
    with pytest.raises(ValueError, match=r"extra.json: 1 image ids are not images of .*gt.json \(first: \[404\]\)"):
        score_results_file(extra, root / "gt.json", metrics=["length"])
    as_text = write(tmp_path / "text_ids.json", [{"image_id": str(r["image_id"]), "caption": r["caption"]}
                                                 for r in results])
    with pytest.raises(ValueError, match="check int vs str ids"):
        score_results_file(as_text, root / "gt.json", metrics=["length"])


def test_missing_captions_warn_and_score_the_intersection(dataset, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(coco, "java_available", lambda: False)
    root, gt, results = dataset
    partial = write(tmp_path / "partial.json", results[3:])
    with caplog.at_level(logging.WARNING, logger="metrics.suite"):
        scores = score_results_file(partial, root / "gt.json", metrics=["coco", "length"])
    assert scores["num_images"] == 7 and scores["num_missing"] == 3
    assert scores["cap_len"] == caption_length([r["caption"] for r in results[3:]])
    assert scores["CIDEr"] == coco_caption_metrics(results[3:], gt)["CIDEr"]
    assert any("partial.json: 3 of 10 images of" in r.getMessage() and "first missing: [1, 2, 3]" in r.getMessage()
               for r in caplog.records)


def test_malformed_inputs_are_named(dataset, tmp_path):
    root, gt, results = dataset
    bad_entry = write(tmp_path / "bad_entry.json", results[:2] + [{"image_id": 3, "text": "no caption key"}])
    with pytest.raises(ValueError, match="bad_entry.json: entry 2 needs 'image_id' and a str 'caption'"):
        score_results_file(bad_entry, root / "gt.json", metrics=["length"])
    not_list = write(tmp_path / "mapping.json", {"1": "a dog"})
    with pytest.raises(ValueError, match="mapping.json: expected a list"):
        score_results_file(not_list, root / "gt.json", metrics=["length"])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        score_results_file(tmp_path / "broken.json", root / "gt.json", metrics=["length"])
    with pytest.raises(FileNotFoundError, match="results file not found: .*absent.json"):
        score_results_file(tmp_path / "absent.json", root / "gt.json")
    with pytest.raises(ValueError, match=r"unknown metric groups \['bleu'\]; valid: \['coco', 'spice'"):
        compute_metrics(results, gt, metrics=["bleu"])
    no_refs = {"images": gt["images"], "annotations": [a for a in gt["annotations"] if a["image_id"] != 4]}
    with pytest.raises(ValueError, match=r"1 scored images have no reference caption \(first: \[4\]\)"):
        compute_metrics(results, no_refs, metrics=["clipscore"])


def test_a_session_prepared_without_images_names_them_when_scoring(dataset, models):
    """The preparation encodes what exists (here nothing); the missing images are an error when scoring."""
    from metrics import prepare_metrics

    _, gt, results = dataset
    with prepare_metrics(gt, ["retrieval", "clipscore"], **models) as session:
        with pytest.raises(ValueError, match=r"\['clipscore', 'retrieval'\] need the images: pass images_root"):
            session.score(results)


def test_image_metrics_need_images(dataset, models, tmp_path):
    root, gt, results = dataset
    with pytest.raises(ValueError, match=r"\['clipscore', 'retrieval'\] need the images: pass images_root"):
        compute_metrics(results, gt, metrics=["retrieval", "clipscore"], **models)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(FileNotFoundError, match=r"10 of 10 image files under images_root .*elsewhere"):
        compute_metrics(results, gt, metrics=["retrieval"], images_root=elsewhere, **models)
    unnamed = {"images": [{"id": i["id"]} for i in gt["images"]], "annotations": gt["annotations"]}
    with pytest.raises(ValueError, match="10 images have no 'file_name'"):
        compute_metrics(results, unnamed, metrics=["clipscore"], images_root=root / "images", **models)


# ---- markdown table --------------------------------------------------------------------------------
RUN = {"cap_len": 22.34, "vocab_size": 4980, "distinct_1": 4.49, "distinct_2": 30.0, "ttr": 0.9123, "R@1": 10.04,
       "R@5": 24.51, "CLIPScore": 75.01, "PPL": 95.64, "Bleu_4": 0.2512, "CIDEr": 0.8149, "METEOR": None}


def test_markdown_row_in_paper_order():
    assert markdown_header().splitlines() == [
        "| Run | Cap. Len. | Lex. Div. (distinct_1) | R@1 | R@5 | CLIPScore | PPL | BLEU-4 | CIDEr |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    assert markdown_row("SMILE", RUN) == "| SMILE | 22.3 | 4.5 | 10.0 | 24.5 | 75.0 | 95.6 | 25.1 | 81.5 |"
    assert markdown_row("a|b", {"cap_len": 1.0}, lex_div="ttr") == "| a/b | 1.0 | - | - | - | - | - | - | - |"
    assert "Lex. Div. (vocab_size)" in markdown_header("vocab_size")
    with pytest.raises(ValueError, match="lex_div must be one of"):
        markdown_row("x", RUN, lex_div="entropy")


def test_make_table_cli(tmp_path):
    first, second = tmp_path / "smile" / "metrics.json", tmp_path / "mle" / "metrics.json"
    for path, run in ((first, RUN), (second, {"metrics": {**RUN, "cap_len": 19.8}})):
        path.parent.mkdir()
        path.write_text(json.dumps(run))
    spec = importlib.util.spec_from_file_location("make_table", REPO / "scripts" / "make_table.py")
    make_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_table)
    out = tmp_path / "table.md"
    assert make_table.main([str(first), str(second), "--out", str(out), "--lex-div", "ttr"]) == 0
    lines = out.read_text().splitlines()
    assert lines[2] == "| smile/metrics | 22.3 | 0.912 | 10.0 | 24.5 | 75.0 | 95.6 | 25.1 | 81.5 |"
    assert lines[3].startswith("| mle/metrics | 19.8 |")

    # as a real command, from another working directory
    shown = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table.py"), str(first), "--names", "SMILE"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert shown.splitlines()[2].startswith("| SMILE | 22.3 | 4.5 |")
    failed = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table.py"), str(first), "--names", "a", "b"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert failed.returncode != 0 and "--names got 2 names for 1 metrics files" in failed.stderr


def test_spice_without_java_is_reported_as_missing(dataset, monkeypatch, caplog):
    root, gt, results = dataset
    monkeypatch.setattr(coco, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="metrics.coco"):
        scores = compute_metrics(results, gt, metrics=["spice"])
    assert list(scores) == expected_keys({"coco", "spice"})
    assert scores["SPICE"] is None and scores["METEOR"] is None and scores["CIDEr"] > 0
    assert any("METEOR and SPICE skipped" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(full_run, dataset, models):
    root, gt, results = dataset
    groups = ["retrieval", "clipscore", "ppl"]
    scores = compute_metrics(results, gt, metrics=groups, images_root=root / "images", device="cuda", **models)
    cpu = full_run[0]
    for key in ("R@1", "R@5", "R@10", "CLIPScore", "RefCLIPScore", "PPL"):
        assert scores[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-3), key


# ---- time: shared embeddings, overlap, preparation --------------------------------------------------
# Values computed from other batch shapes differ by float rounding: CLIPScore terms are clipped at 0 and scaled
# to 0-250 (absolute, as test_full_suite_equals_its_parts), PPL is a mean of exponentials (relative).
ROUNDED = {"CLIPScore": dict(abs=1e-4), "RefCLIPScore": dict(abs=1e-4), "PPL": dict(rel=1e-6)}


def counting(monkeypatch, module, name, log):
    """Wrap ``module.name`` so that every item it is asked to encode is appended to ``log``."""
    original = getattr(module, name)

    def wrapper(items, *args, **kwargs):
        log.extend(items)
        return original(items, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("overlap", [True, False])
def test_each_image_and_text_is_encoded_once(dataset, models, monkeypatch, overlap):
    import metrics.suite as suite

    root, gt, results = dataset
    images, texts = [], []
    counting(monkeypatch, suite, "encode_images", images)
    counting(monkeypatch, suite, "encode_texts", texts)
    # generated captions repeat: two images share a caption, so retrieval and CLIPScore need 9 distinct ones
    results = [dict(r) for r in results]
    results[1]["caption"] = results[0]["caption"]
    scores = compute_metrics(results, gt, metrics=["retrieval", "clipscore"], images_root=root / "images",
                             overlap=overlap, **models)
    assert sorted(Path(p).name for p in images) == sorted(image["file_name"] for image in gt["images"])
    assert len(texts) == len(set(texts))  # each distinct text went to CLIP once, shared by both groups
    captions = [r["caption"] for r in results]
    prefixed = {f"A photo depicts {c}" for c in captions}
    references = {f"A photo depicts {a['caption']}" for a in gt["annotations"]}
    assert set(texts) == set(captions) | prefixed | references
    expected = compute_metrics(results, gt, metrics=["retrieval"], images_root=root / "images", **models)
    assert {k: scores[k] for k in METRIC_KEYS["retrieval"]} == {k: expected[k] for k in METRIC_KEYS["retrieval"]}


@pytest.mark.slow
def test_overlapped_equals_sequential(full_run, dataset, models):
    """The default (overlapped) run of `full_run` against every group computed in turn in this thread."""
    root, gt, results = dataset
    timings = {}
    sequential = compute_metrics(results, gt, images_root=root / "images", overlap=False, timings=timings, **models)
    overlapped = full_run[0]
    assert list(sequential) == list(overlapped)
    exact = [k for k in overlapped if k not in ROUNDED]
    assert {k: overlapped[k] for k in exact} == {k: sequential[k] for k in exact}  # COCO, counts, R@K: identical
    for key, tolerance in ROUNDED.items():  # other batch shapes: float rounding only
        assert overlapped[key] == pytest.approx(sequential[key], **tolerance), key
    assert "clip_images" in timings and "coco" in timings


def test_prepared_session_scores_any_subset_like_compute_metrics(dataset, models, monkeypatch):
    """Prepared before the captions exist (all GT images), then scoring two result sets: as compute_metrics."""
    monkeypatch.setattr(coco, "java_available", lambda: False)  # no JVM start: this test is about the session
    from metrics import prepare_metrics

    root, gt, results = dataset
    groups = ["coco", "length", "retrieval", "clipscore", "ppl"]
    with prepare_metrics(gt, groups, images_root=root / "images", **models) as session:
        full = session.score(results)
        partial = session.score(results[3:])
    for got, subset in ((full, results), (partial, results[3:])):
        expected = compute_metrics(subset, gt, metrics=groups, images_root=root / "images", overlap=False, **models)
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key] == (None if value is None else pytest.approx(value, **ROUNDED.get(key, {}))), key
    assert partial["num_missing"] == 3 and partial["retrieval_pool"] == 7
    with pytest.raises(RuntimeError, match="closed"):
        session.score(results)


# Image decoding beside the session's thread pool: threads, never forked processes ----------------------------
@pytest.fixture()
def no_fork(monkeypatch):
    """Fail the test if anything forks: a process forked while another thread holds a lock (an import lock, a
    logging lock) inherits it held, and its worker waits forever; workers forked from a ThreadPoolExecutor thread
    also exited with status 1, which torch's SIGCHLD handler raised in the main thread."""
    import os

    def refuse():
        raise AssertionError("a process was forked while encoding images")

    monkeypatch.setattr(os, "fork", refuse)


def test_images_encoded_in_a_thread_pool_fork_nothing(dataset, models, no_fork):
    """As MetricSession encodes images: in a ThreadPoolExecutor thread, with 2 decoding workers (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from metrics.clip_metrics import encode_images, load_clip

    root, gt, _ = dataset
    paths = [root / "images" / image["file_name"] for image in gt["images"]]
    clip = load_clip(models["clip_model"])
    with ThreadPoolExecutor(1) as pool:
        threaded = pool.submit(encode_images, paths, clip, batch_size=3, num_workers=2, progress=False).result()
    assert torch.equal(threaded, encode_images(paths, clip, batch_size=3, num_workers=0, progress=False))


def test_prepared_session_encodes_images_without_forking(dataset, models, no_fork, monkeypatch):
    """The same through MetricSession itself: its background CLIP preparation and, for images it had not prepared,
    `score` in this thread."""
    monkeypatch.setattr(coco, "java_available", lambda: False)
    from metrics import prepare_metrics

    root, gt, results = dataset
    with prepare_metrics(gt, ["retrieval"], images_root=root / "images", batch_size=3, num_workers=2,
                         **models) as session:
        scores = session.score(results)
    assert scores["retrieval_pool"] == 10
