"""metrics/plots.py: the numbers behind the plots, valid PNGs, make_table's plot options, and plots that fail
without costing the results they illustrate."""
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import eval_caption
from data import ensure_toy_dataset
from metrics import plots
from metrics.suite import markdown_table

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import make_table  # noqa: E402

CAPTIONS = {
    "MLE": ["A dog.", "a cat", "A red bus on the street.", "two dogs", "a cat"],
    "SMILE": ["A large brown dog sitting on the green grass!", "a cat (small) lying on a bed; next to a lamp",
              "a red bus", "", "Two dogs   playing"],
}


def naive_length(caption: str) -> int:
    """Words after BLIP's normalisation, written out independently of metrics/text_stats.py."""
    for character in '.!"()*#:;~':
        caption = caption.replace(character, " ")
    return len(re.findall(r"\S+", caption.lower()))


def assert_png(path: Path, min_size=(300, 200)) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1], image.size
        assert image.width <= 3000 and image.height <= 3000, image.size
        return image.size


def test_length_counts_equal_a_naive_count():
    for captions in CAPTIONS.values():
        assert plots.length_counts(captions) == dict(sorted(Counter(map(naive_length, captions)).items()))
    assert plots.length_counts(["a b c", "a b c", "a"]) == {1: 1, 3: 2}


def test_histogram_bins_are_shared_integer_bins_holding_the_naive_counts():
    edges, counts = plots.length_histogram(CAPTIONS)
    lengths = {run: [naive_length(c) for c in captions] for run, captions in CAPTIONS.items()}
    lowest = min(min(v) for v in lengths.values())
    highest = max(max(v) for v in lengths.values())
    assert (lowest, highest) == (0, 11)  # the empty SMILE caption counts as length 0
    assert edges == [k - 0.5 for k in range(lowest, highest + 2)]
    for run, heights in counts.items():
        assert len(heights) == len(edges) - 1
        assert sum(heights) == len(CAPTIONS[run])
        for index, height in enumerate(heights):
            left, right = edges[index], edges[index + 1]
            assert height == sum(left < n < right for n in lengths[run]), (run, index)


def test_histogram_rejects_no_runs_and_empty_runs():
    with pytest.raises(ValueError, match="empty"):
        plots.length_histogram({})
    with pytest.raises(ValueError, match="'B'"):
        plots.length_histogram({"A": ["a dog"], "B": []})


def _pyplot_figures():
    """Open pyplot figures, or None while pyplot is not imported (other tests may import it)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    return None if pyplot is None else pyplot.get_fignums()


def test_histogram_png_is_valid_for_one_and_several_runs(tmp_path):
    figures = _pyplot_figures()
    assert plots.caption_length_histogram(CAPTIONS, tmp_path / "sub" / "two.png") == tmp_path / "sub" / "two.png"
    assert_png(tmp_path / "sub" / "two.png")
    assert_png(plots.caption_length_histogram({"only": CAPTIONS["MLE"]}, tmp_path / "one.png"))
    assert not list(tmp_path.rglob("*.tmp.png"))  # the temporary file was renamed into place
    # The object API only: pyplot is neither imported nor left holding figures, so a caller's backend and
    # figures are untouched.
    assert _pyplot_figures() == figures


RUNS = {
    "MLE": {"cap_len": 4.04, "distinct_1": 5.42, "vocab_size": 22, "Bleu_4": 0.486, "CIDEr": 2.433,
            "R@1": None, "PPL": None, "METEOR": 0.4},
    "SMILE": {"cap_len": 11.0, "distinct_1": 2.0, "Bleu_4": 0.42, "CIDEr": 1.241, "R@1": None, "CLIPScore": 70.25},
}


def test_chart_panels_follow_the_table_and_skip_metrics_absent_for_every_run():
    panels = plots.chart_panels(RUNS)
    assert [p["title"] for p in panels] == ["Cap. Len.", "Lex. Div. (distinct_1)", "CLIPScore", "BLEU-4 (x100)",
                                           "CIDEr (x100)"]  # R@1, R@5 and PPL are None or missing for both runs
    by_key = {p["key"]: p["values"] for p in panels}
    assert by_key["CIDEr"] == pytest.approx({"MLE": 243.3, "SMILE": 124.1})
    assert by_key["CLIPScore"] == {"MLE": None, "SMILE": 70.25}  # present for one run: kept, "-" for the other
    # The bar labels are the table's cells.
    table = markdown_table(list(RUNS.items()))
    for run in RUNS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {run} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        table_cells = dict(zip(["cap_len", "distinct_1", "R@1", "R@5", "CLIPScore", "PPL", "Bleu_4", "CIDEr"], cells))
        for panel in panels:
            value = panel["values"][run]
            assert ("-" if value is None else panel["format"].format(value)) == table_cells[panel["key"]]

    assert [p["title"] for p in plots.chart_panels(RUNS, lex_div="vocab_size")][1] == "Lex. Div. (vocab_size)"
    chosen = plots.chart_panels(RUNS, metrics=["METEOR", "CIDEr", "PPL"])
    assert [(p["key"], p["title"]) for p in chosen] == [("METEOR", "METEOR"), ("CIDEr", "CIDEr (x100)")]
    assert chosen[0]["values"] == {"MLE": 0.4, "SMILE": None}


def test_comparison_chart_png_and_nothing_to_plot(tmp_path):
    assert_png(plots.metric_comparison_chart(RUNS, tmp_path / "chart.png"))
    assert_png(plots.metric_comparison_chart({"one": {"CIDEr": 1.0}}, tmp_path / "single.png"), (100, 100))
    with pytest.raises(ValueError, match="has a value for any run"):
        plots.metric_comparison_chart(RUNS, tmp_path / "none.png", metrics=["R@1", "PPL"])
    assert not (tmp_path / "none.png").exists()


def _write_run(folder: Path, metrics: dict, captions: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    (folder / "test_results.json").write_text(json.dumps([{"image_id": i, "caption": c}
                                                          for i, c in enumerate(captions)]))
    return folder / "test_metrics.json"


def test_make_table_writes_the_table_then_the_plots(tmp_path, capsys):
    files = [_write_run(tmp_path / run.lower(), RUNS[run], CAPTIONS[run]) for run in RUNS]
    out = tmp_path / "table.md"
    assert make_table.main([*map(str, files), "--names", "MLE", "SMILE", "--out", str(out), "--title", "t",
                            "--plot", str(tmp_path / "metrics.png"), "--length-plot", str(tmp_path / "len.png")]) == 0
    assert "| SMILE | 11.0 |" in out.read_text()
    assert_png(tmp_path / "metrics.png")
    assert_png(tmp_path / "len.png")

    # --results names the files explicitly; without results files beside the metrics, a message says what to pass.
    elsewhere = tmp_path / "captions.json"
    elsewhere.write_text(json.dumps([{"image_id": 1, "caption": "a dog"}]))
    lone = tmp_path / "lone" / "metrics.json"
    lone.parent.mkdir()
    lone.write_text(json.dumps(RUNS["MLE"]))
    assert make_table.main([str(lone), "--length-plot", str(tmp_path / "lone.png"), "--results", str(elsewhere)]) == 0
    assert_png(tmp_path / "lone.png")
    with pytest.raises(SystemExit, match="results file"):
        make_table.main([str(lone), "--length-plot", str(tmp_path / "missing.png")])
    assert "| metrics | 4.0 |" in capsys.readouterr().out  # the table was printed before the plot failed
    nothing = _write_run(tmp_path / "empty", {"num_images": 3}, ["a"])
    with pytest.raises(SystemExit, match="has a value for any run"):
        make_table.main([str(nothing), "--plot", str(tmp_path / "x.png")])


def test_make_table_averages_a_run_over_seeds_and_gives_its_range(tmp_path):
    """A comma-joined argument is one run over several seeds: its row is the mean, and a second table gives the
    min-max range; a metric one seed lacks is '-' rather than the mean of the others."""
    seeds = []
    for seed, (cider, grounding) in enumerate([(4.0, 85.0), (5.0, 90.0), (6.0, 98.0)]):
        path = tmp_path / f"seed{seed}" / "test_metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"cap_len": 3.0, "CIDEr": cider, "ground_colour_shape": grounding,
                                    "R@1": None if seed == 1 else 20.0}))
        seeds.append(str(path))
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"cap_len": 11.0, "CIDEr": 2.5, "ground_colour_shape": 90.0, "R@1": 60.0}))
    out = tmp_path / "table.md"
    assert make_table.main([",".join(seeds), str(single), "--names", "MLE (3 seeds)", "SMILE", "--out", str(out)]) == 0
    text = out.read_text()
    mean_row = next(line for line in text.splitlines() if line.startswith("| MLE (3 seeds) | 3.0 |"))
    assert "| 500.0 |" in mean_row and "| 91.0 |" in mean_row  # CIDEr x100, grounding: means of the three seeds
    assert mean_row.split(" | ")[3] == "-"  # R@1 is missing for one seed
    tables = text.split("Spread over seeds (min-max):")
    assert len(tables) == 2 and "SMILE" not in tables[1]
    assert "| MLE (3 seeds) | 3.0-3.0 |" in tables[1] and "| 400.0-600.0 |" in tables[1] and "| 85.0-98.0 |" in tables[1]


@pytest.fixture()
def results_and_gt(tmp_path):
    gt = {"images": [{"id": i} for i in range(4)],
          "annotations": [{"image_id": i, "id": i, "caption": "a dog on the grass"} for i in range(4)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": i, "caption": c} for i, c in enumerate(["a dog", "a dog on grass", "a cat", "dog"])]
    (tmp_path / "test_results.json").write_text(json.dumps(results))
    return tmp_path / "test_results.json", tmp_path / "gt.json"


def test_results_mode_writes_the_length_plot_beside_the_metrics(results_and_gt, tmp_path):
    results, gt = results_and_gt
    out = tmp_path / "scores" / "metrics.json"
    metrics = eval_caption.main(["--results", str(results), "--annotations", str(gt), "--metrics",
                                 "length,diversity", "--out", str(out)])
    assert json.loads(out.read_text()) == metrics
    assert_png(tmp_path / "scores" / "test_caption_lengths.png")
    eval_caption.main(["--results", str(results), "--annotations", str(gt), "--metrics", "length",
                       "--length-plot", str(tmp_path / "chosen.png")])
    assert_png(tmp_path / "chosen.png")


def _raise(*args, **kwargs):
    raise RuntimeError("plotting broke")


# eval_caption.main sets up logging afresh (logging.basicConfig(force=True) drops caplog's handler), so its
# warnings are read from stderr.
def test_a_failing_plot_only_warns_and_the_metrics_are_written(results_and_gt, tmp_path, monkeypatch, capfd):
    results, gt = results_and_gt
    out = tmp_path / "metrics.json"
    monkeypatch.setattr(plots, "caption_length_histogram", _raise)
    metrics = eval_caption.main(["--results", str(results), "--annotations", str(gt), "--metrics", "length",
                                 "--out", str(out)])
    assert metrics["cap_len"] == pytest.approx(9 / 4)
    assert json.loads(out.read_text()) == metrics
    err = capfd.readouterr().err
    assert "could not write the caption-length plot" in err and "plotting broke" in err
    assert not (tmp_path / "test_caption_lengths.png").exists()


def test_without_matplotlib_the_plot_is_a_warning(monkeypatch, tmp_path, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with caplog.at_level(logging.WARNING):
        assert plots.plot_caption_lengths_or_warn([{"image_id": 1, "caption": "a dog"}], tmp_path / "x.png",
                                                  run="r") is None
    assert "matplotlib" in caplog.text and "requirements.txt" in caplog.text
    assert not (tmp_path / "x.png").exists()


def test_config_mode_evaluation_keeps_results_and_metrics_when_the_plot_fails(tmp_path, monkeypatch, capfd):
    toy = ensure_toy_dataset(tmp_path / "toy")
    options = [f"data.toy_root={tmp_path / 'toy'}", f"output_dir={tmp_path / 'eval'}", "data.num_workers=0",
               "eval.max_images=4", "eval.metrics=[length]", "eval.max_length=8", "eval.num_beams=1"]
    argv = ["--config", str(REPO / "configs" / "toy" / "pretrain.yaml"), "--split", "test"]
    argv += [item for option in options for item in ("--opt", option)]
    assert toy["test_file"].exists()
    eval_caption.main(argv)
    assert_png(tmp_path / "eval" / "eval_test_caption_lengths.png")

    monkeypatch.setattr(plots, "caption_length_histogram", _raise)
    (tmp_path / "eval" / "eval_test_caption_lengths.png").unlink()
    metrics = eval_caption.main(argv)  # random weights, drawn afresh: other captions than the first time
    assert "plotting broke" in capfd.readouterr().err
    assert json.loads((tmp_path / "eval" / "eval_test_metrics.json").read_text()) == metrics
    assert len(json.loads((tmp_path / "eval" / "eval_test_results.json").read_text())) == 4
    assert not (tmp_path / "eval" / "eval_test_caption_lengths.png").exists()
