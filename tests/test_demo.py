"""demo.py: upload checks, decoding settings, side-by-side captions, and the page itself in headless Chromium.

Two tiny random models (different seeds, so their gibberish differs) stand in for MLE and SMILE.
"""
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from browser import require_browser
from PIL import Image

import demo
from metrics.text_stats import caption_length
from models import BlipCaptioner, Captioner
from models.checkpoint import save_transformers_directory

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
MB = 2**20
# Beam search over the repository's defaults, with captions cut at 20 tokens: random weights never emit [SEP], so
# every caption runs to max_length, and 64 tokens (the tiny decoder's limit) only makes the tests slower.
SETTINGS = demo.DecodingSettings(max_length=20)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_models")
    dirs = []
    for seed, name in ((1, "smile"), (2, "mle")):
        torch.manual_seed(seed)
        model = BlipCaptioner.build("tiny", image_size=32, tokenizer=FIXTURES / "vocab.txt")
        dirs.append(save_transformers_directory(model, root / name))
    return dirs


@pytest.fixture(scope="module")
def captioners(model_dirs):
    return {"SMILE": Captioner.from_pretrained(model_dirs[0], device="cpu"),
            "MLE": Captioner.from_pretrained(model_dirs[1], device="cpu")}


def make_png(path, size=(40, 30)):
    image = Image.new("RGB", size, (20, 20, 120))
    for x in range(size[0] // 2):
        for y in range(size[1] // 2):
            image.putpixel((x, y), (230, 120, 20))
    image.save(path)
    return path


def png_claiming(path, width, height):
    """A valid PNG signature and IHDR that claim width x height, and no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


# Upload checks ------------------------------------------------------------------------------------------------


def test_accepts_png_and_jpeg(tmp_path):
    png = make_png(tmp_path / "a.png")
    jpeg = tmp_path / "a.jpg"
    Image.open(png).save(jpeg, quality=90)
    for path in (png, jpeg):
        image = demo.validate_upload(path, max_bytes=MB)
        assert image.mode == "RGB" and image.size == (40, 30)


def test_rejects_text_renamed_png(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image at all\n")
    with pytest.raises(demo.InputError, match=r"notes\.png is not a readable image"):
        demo.validate_upload(fake, max_bytes=MB)


def test_rejects_truncated_png(tmp_path):
    whole = make_png(tmp_path / "whole.png", size=(64, 64)).read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(demo.InputError, match="not a readable image"):
        demo.validate_upload(cut, max_bytes=MB)


def test_rejects_oversized_file_before_reading_it(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MB + 1))  # not even an image: the size check must come first
    with pytest.raises(demo.InputError, match=r"big\.png is 1\.0 MB; the limit is 1 MB"):
        demo.validate_upload(big, max_bytes=MB)


def test_rejects_decompression_bombs(tmp_path):
    # A 60-byte file claiming 10 gigapixels: PIL itself refuses it (past 2 x Image.MAX_IMAGE_PIXELS).
    with pytest.raises(demo.InputError, match="too many pixels"):
        demo.validate_upload(png_claiming(tmp_path / "bomb.png", 100_000, 100_000), max_bytes=MB)
    # Under PIL's limit but over ours: refused from the header, before any decoding.
    with pytest.raises(demo.InputError, match=r"9000 x 9000 pixels .* the limit is 50 megapixels"):
        demo.validate_upload(png_claiming(tmp_path / "large.png", 9000, 9000), max_bytes=MB)
    with pytest.raises(demo.InputError, match="the limit is 0.001 megapixels"):
        demo.validate_upload(make_png(tmp_path / "small.png"), max_bytes=MB, max_pixels=1000)


# Settings and captions ----------------------------------------------------------------------------------------


def test_defaults_follow_the_repository_eval_config(captioners):
    """The page starts from configs/default.yaml's eval section, lengths cut to the tiny decoder's 64 positions."""
    evaluation = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["eval"]
    settings = demo.default_settings(captioners)
    assert settings.method == (demo.NUCLEUS_SAMPLING if evaluation["sample"] else demo.BEAM_SEARCH)
    assert settings.num_beams == evaluation["num_beams"]
    assert settings.top_p == evaluation["top_p"]
    assert settings.repetition_penalty == evaluation["repetition_penalty"]
    assert settings.min_length == evaluation["min_length"]
    assert demo.length_limit(captioners) == 64
    assert settings.max_length == min(evaluation["max_length"], 64)


def test_bad_settings_are_refused():
    with pytest.raises(demo.InputError, match="min length"):
        demo.DecodingSettings(max_length=10, min_length=20)
    with pytest.raises(demo.InputError, match="top-p"):
        demo.DecodingSettings(top_p=0.0)


def test_captions_and_word_counts_for_both_models(captioners, tmp_path):
    image = demo.validate_upload(make_png(tmp_path / "a.png"), max_bytes=MB)
    settings = SETTINGS
    results = demo.caption_with_all(captioners, image, settings)
    assert list(results) == ["SMILE", "MLE"]
    for name, (caption, words) in results.items():
        assert caption == captioners[name].caption(image, **settings.caption_options())
        assert words == caption_length([caption]) and words > 0
    assert results["SMILE"][0] != results["MLE"][0]
    assert demo.format_length(1) == "1 word" and demo.format_length(12) == "12 words"


def test_sampling_is_reproducible_from_the_seed(captioners, tmp_path):
    image = demo.validate_upload(make_png(tmp_path / "a.png"), max_bytes=MB)
    sampled = demo.DecodingSettings(method=demo.NUCLEUS_SAMPLING, max_length=20, seed=7)
    first = demo.caption_with_all(captioners, image, sampled)
    reordered = demo.caption_with_all(dict(reversed(captioners.items())), image, sampled)
    assert reordered == first  # a model's sample depends on the seed, not on which model ran first
    others = {demo.caption_with_all(captioners, image, demo.DecodingSettings(
        method=demo.NUCLEUS_SAMPLING, max_length=20, seed=seed))["SMILE"][0] for seed in range(4)}
    assert len(others) > 1


# Command line -------------------------------------------------------------------------------------------------


def test_command_line_defaults_and_names(tmp_path, capsys):
    run = tmp_path / "runs" / "smile"
    run.mkdir(parents=True)
    (run / "checkpoint_best.safetensors").write_bytes(b"")
    args = demo.parse_args(["--checkpoint", str(run / "checkpoint_best.safetensors"), "--checkpoint", "org/mle"])
    assert args.host == "127.0.0.1" and args.name == ["smile", "mle"] and args.max_upload_mb == 10
    with pytest.raises(SystemExit):
        demo.parse_args(["--checkpoint", "a", "--checkpoint", "b", "--name", "A"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--checkpoint", "x/a", "--checkpoint", "y/a"])  # two columns called "a"
    with pytest.raises(SystemExit):
        demo.parse_args(["--checkpoint", "a", "--checkpoint", "b", "--checkpoint", "c"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--help"])
    assert "127.0.0.1" in " ".join(capsys.readouterr().out.split())


def test_main_loads_both_checkpoints_and_serves_locally(model_dirs, monkeypatch):
    pytest.importorskip("gradio")
    served = {}
    monkeypatch.setattr(demo, "launch", lambda app, **options: served.update(app=app, **options))
    assert demo.main(["--checkpoint", str(model_dirs[0]), "--checkpoint", str(model_dirs[1]), "--device", "cpu"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 7860 and served["max_upload_mb"] == 10
    labels = [block.label for block in served["app"].blocks.values() if block.elem_id in ("caption-0", "caption-1")]
    assert labels == ["smile", "mle"]  # named after their folders


def test_launch_is_local_private_and_offline():
    pytest.importorskip("gradio")

    class FakeBlocks:
        def launch(self, **options):
            self.options = options

    fake = FakeBlocks()
    demo.launch(fake, port=1234, max_upload_mb=2)
    options = fake.options
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    assert options["max_file_size"] == 2 * MB
    # System fonts only: nothing to fetch (the browser test checks that every request the page makes is local).
    assert options["theme"].font.startswith("ui-sans-serif") and options["theme"].font_mono.startswith("ui-monospace")


# The page in a browser ----------------------------------------------------------------------------------------


def test_missing_browser_skips_here_and_fails_in_ci(monkeypatch):
    import browser

    # Whatever else this machine lacks (a newcomer may have neither the extras nor Chromium), the message names
    # every missing piece with the command that installs it.
    monkeypatch.setattr(browser, "CHROMEDRIVER", Path("/nonexistent/chromedriver"))
    monkeypatch.delenv(browser.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/chromedriver is missing "
                                                      r"\(apt install chromium-driver\)"):
        browser.require_browser()
    monkeypatch.setattr(browser, "CHROMIUM", Path("/nonexistent/chromium"))
    with pytest.raises(pytest.skip.Exception, match=r"chromium is missing \(apt install chromium\); "
                                                      r"/nonexistent/chromedriver is missing"):
        browser.require_browser()
    monkeypatch.setenv(browser.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SMILE_REQUIRE_BROWSER=1 but"):
        browser.require_browser()


def test_browser_upload_caption_and_rejection(captioners, tmp_path, monkeypatch):
    require_browser()
    from browser import caption_upload, free_port, headless_chromium, upload_file
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # uploads land here, not in /tmp/gradio
    image_path = make_png(tmp_path / "shapes.png")
    expected = {name: captioner.caption(str(image_path), **SETTINGS.caption_options())
                for name, captioner in captioners.items()}
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture\n")

    app = demo.build_demo(captioners, defaults=SETTINGS)  # the page's controls start at SETTINGS
    port = free_port()
    demo.launch(app, port=port, prevent_thread_lock=True)
    driver = None
    try:
        driver = headless_chromium(tmp_path / "chromium-profile")

        def text_of(css):
            return driver.find_element(By.CSS_SELECTOR, css).text.strip()

        driver.get(f"http://127.0.0.1:{port}/")
        shown = caption_upload(driver, image_path, models=len(captioners), timeout=60)
        assert shown == list(expected.values())
        for index, (name, caption) in enumerate(expected.items()):
            assert text_of(f"#caption-{index}").startswith(name)  # the column's label
            assert text_of(f"#length-{index}") == f"{caption_length([caption]):.0f} words"
        assert text_of("#status") == ""

        # Everything the page loaded came from the demo itself (fonts included): it works offline.
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(url.startswith(f"http://127.0.0.1:{port}/") for url in loaded), loaded

        driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
        upload_file(driver, not_image)
        WebDriverWait(driver, 60).until(lambda d: "not a readable image" in text_of("#status"))
        status = driver.find_element(By.ID, "status")
        assert status.is_displayed() and "notes.png" in status.text
        assert not driver.find_elements(By.CSS_SELECTOR, "#preview img")
        assert all(text_of(f"#length-{index}") == "" for index in range(len(captioners)))
    except BaseException:
        if driver is not None:
            driver.save_screenshot(str(tmp_path / "failure.png"))
            (tmp_path / "failure.html").write_text(driver.page_source)
            print(f"screenshot and page source: {tmp_path}/failure.png, failure.html")
        raise
    finally:
        if driver is not None:
            driver.quit()
        app.close()
