"""FineCapEval: the authors' phrase-recall "Acc" on a hand-worked CSV, the CLI, and the prepare_data check."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from metrics.finecapeval import (
    FINECAP_KEYS,
    FineCapEvalError,
    finecap_scores,
    finecapeval_gt,
    image_stem,
    phrase_recall,
    read_finecapeval_csv,
    split_phrases,
)

ROOT = Path(__file__).resolve().parents[2]
HEADER = "image,caption,background,object,relation\n"
# Row 2 (empty background) and row 4 (relation "NA", pandas' missing value) are dropped whole, as the scorer does.
HAND_CSV = HEADER + (
    '1.jpg,A dog runs on grass.,green grass\\;a park,a brown dog,running on the grass\n'
    '2.jpg,Two men.,,men,talk\n'
    '3.jpg,A cat.,the sky,cats\\;x,--\n'
    '1.jpg,A puppy.,field,puppy,NA\n'
)
HAND_RESULTS = [
    {"image_id": "1.jpg", "caption": "a brown dog running on green grass"},
    {"image_id": "2.jpg", "caption": "two men talking"},  # its only row is dropped: not scored
    {"image_id": "3.jpg", "caption": "A Cat under the Sky"},
]
# Worked by hand (stems: running->run, cats->cat; lookups are case-sensitive substrings of the raw caption):
#   1.jpg background: "green grass" 2/2, "a park" 1/2 ("a" is in the caption) -> 0.75; object "a brown dog" -> 1;
#         relation "run on the grass": run (in "running"), on, grass found, "the" not -> 0.75.
#   3.jpg background "the sky": "the" yes, "sky" no ("Sky") -> 0.5; object: "x" is one char and dropped,
#         "cat" not in "A Cat ..." -> 0; relation "--" is kept (2 chars) but has no word after stripping -> 0.
HAND_ACC = {"finecap_background": 62.5, "finecap_object": 50.0, "finecap_relation": 37.5}


@pytest.fixture()
def hand_csv(tmp_path):
    path = tmp_path / "FineCapEval.csv"
    path.write_text(HAND_CSV)
    return path


def test_hand_worked_csv(hand_csv):
    data = read_finecapeval_csv(hand_csv)
    assert data.dropped_rows == [2, 4]
    assert data.dropped_images == ["2.jpg"]
    assert data.captions == {"1": ["A dog runs on grass."], "3": ["A cat."]}
    assert data.phrases["background"]["1"] == ["green grass", "a park"]
    assert data.phrases["object"]["3"] == ["cat"]
    assert data.phrases["relation"] == {"1": ["run on the grass"], "3": [""]}
    scores = finecap_scores([(image_stem(r["image_id"]), r["caption"]) for r in HAND_RESULTS if r["image_id"] != "2.jpg"],
                            data)
    assert scores == pytest.approx(HAND_ACC)


def test_phrase_processing_follows_nltk():
    # lower-cased before splitting; Porter (NLTK_EXTENSIONS) stems; punctuation deleted inside tokens
    assert split_phrases("Happily Running\\;A Man's hat\\;b") == ["happili run", "a man s hat"]
    # "happili" is not a substring of "happily": stemming can lose a match
    assert phrase_recall(["happili run"], "smiling happily and running") == 0.5
    # substring test on the raw caption: "s" is found in any caption with an s; the lookup is case-sensitive
    assert phrase_recall(["a man s hat"], "A MAN WITH HATS") == 0.0
    assert phrase_recall(["a man s hat"], "a man's hats") == 1.0
    # a piece of one character is not a phrase; one of two characters is, even if it is " a"
    assert split_phrases("a\\; a") == ["a"]
    assert phrase_recall([], "anything") == 0.0


def test_pandas_style_missing_values_and_numeric_columns(tmp_path):
    path = tmp_path / "f.csv"
    # "None" and "null" are pandas missing values; " " is a str (kept, but no phrase of more than 1 char)
    path.write_text(HEADER + "1.jpg,c,None,o1,r1\n2.jpg,c,b2,null,r2\n3.jpg,c, ,o3,r3\n\n")
    data = read_finecapeval_csv(path)
    assert sorted(data.captions) == ["3"] and data.phrases["background"]["3"] == []
    # a column pandas parses as numbers holds no str: every row is dropped
    path.write_text(HEADER + "1.jpg,c,b,1,r\n2.jpg,c,b,2.5,r\n")
    assert read_finecapeval_csv(path).captions == {}
    path.write_text(HEADER + "1.jpg,c,b,1,r\n2.jpg,c,b,two,r\n")
    assert read_finecapeval_csv(path).phrases["object"] == {"1": [], "2": ["two"]}


def test_bad_csv_errors_name_file_row_column(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("image,caption,background,object\n1.jpg,c,b,o\n")
    with pytest.raises(FineCapEvalError, match=r"f\.csv: missing columns \['relation'\]"):
        read_finecapeval_csv(path)
    path.write_text(HEADER + "1.jpg,c,b,o,r\n,c,b,o,r\n")
    with pytest.raises(FineCapEvalError, match=r"row 2 \(line 3\) column 'image'"):
        read_finecapeval_csv(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_finecapeval_csv(tmp_path / "nope.csv")


def test_gt_from_caption_column(hand_csv):
    gt = finecapeval_gt(read_finecapeval_csv(hand_csv))
    assert gt["images"] == [{"id": "1.jpg", "file_name": "1.jpg"}, {"id": "3.jpg", "file_name": "3.jpg"}]
    assert [(a["image_id"], a["caption"]) for a in gt["annotations"]] == [("1.jpg", "A dog runs on grass."),
                                                                            ("3.jpg", "A cat.")]


def test_cli_writes_the_three_keys(hand_csv, tmp_path):
    import eval_caption

    results = tmp_path / "R.json"
    results.write_text(json.dumps(HAND_RESULTS))
    out = tmp_path / "M.json"
    eval_caption.main(["--results", str(results), "--finecapeval", str(hand_csv), "--metrics", "finecapeval",
                       "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert {k: metrics[k] for k in FINECAP_KEYS} == pytest.approx(HAND_ACC)
    assert metrics["num_images"] == 2 and metrics["num_missing"] == 0
    # the overall score: COCO metrics against the caption column (BLEU/ROUGE-L/CIDEr even without Java)
    assert 0.0 <= metrics["CIDEr"] and 0.0 <= metrics["Bleu_1"] <= 1.0


def test_finecapeval_group_needs_the_csv(hand_csv):
    from metrics.suite import compute_metrics

    gt = finecapeval_gt(read_finecapeval_csv(hand_csv))
    with pytest.raises(ValueError, match="needs the FineCapEval CSV"):
        compute_metrics(HAND_RESULTS[:1], gt, metrics=["finecapeval"])


@pytest.mark.parametrize("with_annotations", [False, True])
def test_a_missing_csv_is_one_line_and_exit_2_before_scoring(hand_csv, tmp_path, capsys, monkeypatch,
                                                             with_annotations):
    import eval_caption
    import training
    import utils
    from metrics import suite

    monkeypatch.setattr(suite, "compute_metrics", lambda *a, **k: pytest.fail("scoring started"))
    results = tmp_path / "R.json"
    results.write_text(json.dumps(HAND_RESULTS))
    argv = ["--results", str(results), "--finecapeval", str(tmp_path / "missing.csv"), "--metrics", "finecapeval"]
    if with_annotations:
        gt = tmp_path / "gt.json"
        gt.write_text(json.dumps(finecapeval_gt(read_finecapeval_csv(hand_csv))))
        argv += ["--annotations", str(gt)]
    assert utils.run_cli(eval_caption.main, training.USER_ERRORS, argv, prog="eval_caption.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_caption.py: error: --finecapeval: file not found: ")
    assert "missing.csv" in err[0]


def test_a_missing_csv_fails_a_session_before_the_captions_exist(hand_csv, tmp_path):
    """Library and config mode (eval.finecapeval): prepare_metrics, which runs before generation, reads the CSV;
    a missing one is a user error (one line from the CLIs), also a FileNotFoundError."""
    from metrics._common import MetricInputError
    from metrics.suite import prepare_metrics, score_results_file
    from training.evaluation import scoring_session

    gt = finecapeval_gt(read_finecapeval_csv(hand_csv))
    missing = tmp_path / "missing.csv"
    with pytest.raises(MetricInputError, match=f"FineCapEval CSV {missing} does not exist"):
        prepare_metrics(gt, ["finecapeval"], finecapeval=missing)
    config = {"eval": {"clip_model": "unused", "ppl_model": "unused", "finecapeval": str(missing), "instances": None}}
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        with scoring_session(gt, config, ["finecapeval", "length"]):
            pytest.fail("the session started without its CSV")
    results = tmp_path / "R.json"
    results.write_text(json.dumps(HAND_RESULTS))
    with pytest.raises(MetricInputError, match="missing.csv"):
        score_results_file(results, finecapeval=missing)


def test_prepare_data_check(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    prepare_data = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "prepare_data", prepare_data)  # its dataclasses look their module up
    spec.loader.exec_module(prepare_data)
    root = tmp_path / "fce"
    (root / "images").mkdir(parents=True)
    (root / "FineCapEval.csv").write_text("image,caption,background,object\n1.jpg,c,b,o\n")
    assert prepare_data.main(["finecapeval", "--root", str(root)]) == 1
    assert "missing columns ['relation']" in capsys.readouterr().err
    (root / "FineCapEval.csv").write_text(HAND_CSV)
    (root / "images" / "1.jpg").write_bytes(b"x")
    assert prepare_data.main(["finecapeval", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "2 of 3 images are missing" in err and "2.jpg" in err
    for name in ("2.jpg", "3.jpg"):
        (root / "images" / name).write_bytes(b"x")
    assert prepare_data.main(["finecapeval", "--root", str(root)]) == 0, capsys.readouterr().err
    entries = json.loads((root / "annotations" / "finecapeval_test.json").read_text())
    assert entries == [{"image": "1.jpg", "caption": ["A dog runs on grass."]}, {"image": "3.jpg", "caption": ["A cat."]}]
    gt = json.loads((root / "annotations" / "finecapeval_test_gt.json").read_text())
    assert [(im["id"], im["file_name"]) for im in gt["images"]] == [(1, "1.jpg"), (3, "3.jpg")]
