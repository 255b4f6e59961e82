"""metrics/coco.py under failure: METEOR never blocks forever, fails with one message, and leaves no JVM or thread.

No JVM runs here: a fake ``java`` (a small Python script put first on PATH) plays METEOR's ``-stdio`` protocol,
or fails to: it answers, stays silent, stops itself (SIGSTOP), dies after k replies, fails to start, or interrupts
the test process when it reads its first line. Tiny timeouts are used only with fakes that never answer, so no
test depends on how fast the machine is; the bounded joins below only guard against a regression hanging the suite.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import metrics.coco as coco
from metrics.coco import BLEU_KEYS, MeteorScorer, coco_caption_metrics, java_timeout, ptb_tokenize

# The fake JVM. FAKE_METEOR picks its behaviour; FAKE_METEOR_DIR is a folder for its markers. SCORE lines are
# answered with the hypothesis' number (hypotheses here are "h<number>"), EVAL lines with one score per
# statistics line (that number) and then the corpus score 0.25, so a test sees whether lines kept their order.
FAKE_JAVA = r'''
import os, signal, sys, time

mode = os.environ.get("FAKE_METEOR", "answer")
marks = os.environ.get("FAKE_METEOR_DIR", ".")


def first(name):  # True for the first fake JVM to get here (mkdir is atomic)
    try:
        os.mkdir(os.path.join(marks, name))
        return True
    except FileExistsError:
        return False


if mode == "nostart":
    sys.stderr.write("Error: Unable to access jarfile meteor-1.5.jar\n")
    sys.exit(1)
if mode == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen before reading anything, like a JVM that never gets the CPU
if mode == "first-silent-others-die":
    mode = "silent" if first("silent") else "die:1"
replied = 0
for line in sys.stdin:
    first("got-a-line")
    if mode == "interrupt" and first("interrupted"):
        os.kill(os.getppid(), signal.SIGUSR1)  # the test turns it into a KeyboardInterrupt
    if mode.startswith("die:") and replied == int(mode[4:]):
        sys.stderr.write("java.lang.OutOfMemoryError: Java heap space\n")
        sys.exit(3)
    if mode != "answer" and not mode.startswith("die:"):
        continue  # silent: reads everything, answers nothing
    fields = line.rstrip("\n").split(" ||| ")
    if fields[0] == "SCORE":
        sys.stdout.write(fields[-1].lstrip("h") + " 1 1\n")
    else:
        stats = fields[1:]
        sys.stdout.write("".join(f"{float(s.split()[0])}\n" for s in stats) + "0.25\n")
    sys.stdout.flush()
    replied += 1
time.sleep(3600)  # input closed: stay alive, as a stuck JVM would, until killed
'''


@pytest.fixture
def fake_java(tmp_path, monkeypatch):
    """Put the fake ``java`` first on PATH; returns ``use(mode)``, which selects its behaviour."""
    bin_dir, marks = tmp_path / "bin", tmp_path / "marks"
    bin_dir.mkdir()
    marks.mkdir()
    script = bin_dir / "java"
    script.write_text(f"#!{sys.executable} -S\n{FAKE_JAVA}")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_METEOR_DIR", str(marks))
    monkeypatch.delenv(coco.JAVA_TIMEOUT_ENV, raising=False)

    def use(mode: str):
        monkeypatch.setenv("FAKE_METEOR", mode)
        return marks

    return use


def images(n: int) -> tuple[dict, dict]:
    """``(gts, res)`` for n images; image i's hypothesis is ``h<i>``, so the fake's per-image score is i."""
    gts = {i: [f"a reference for image {i}", "another one"] for i in range(n)}
    return gts, {i: [f"h{i}"] for i in range(n)}


def assert_gone(scorer: MeteorScorer) -> None:
    """Every JVM of `scorer` is dead and reaped (no zombie), its pipes closed, and no METEOR thread is running."""
    for proc in scorer._procs:
        assert proc.returncode is not None, f"METEOR JVM pid {proc.pid} was never reaped"
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)
        assert proc.stdout.closed and proc.stdin.closed
    assert not [t.name for t in threading.enumerate() if t.name.startswith("meteor")]


def run_bounded(fn, bound: float = 120.0):
    """``fn()`` in a thread: (its result, its exception). The bound only stops a regressed, hanging test."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"still blocked after {bound} s"
    return outcome.get("result"), outcome.get("error")


def wait_for(path, bound: float = 120.0) -> None:
    deadline = time.monotonic() + bound
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_streamed_and_sharded_replies_keep_the_image_order(fake_java):
    fake_java("answer")
    gts, res = images(3000)  # ~150 KB of SCORE lines: more than a pipe holds, so writes and reads interleave
    with MeteorScorer(processes=3, timeout=600) as scorer:
        score, per_image = scorer.compute_score(gts, res)
        assert (score, per_image) == (0.25, [float(i) for i in range(3000)])
        assert scorer.compute_score(*images(5)) == (0.25, [0.0, 1.0, 2.0, 3.0, 4.0])  # still usable
    assert_gone(scorer)


def test_a_silent_jvm_fails_after_the_timeout_naming_meteor_and_what_to_do(fake_java):
    fake_java("silent")
    scorer = MeteorScorer(processes=1, timeout=0.3)
    with pytest.raises(RuntimeError) as caught:
        scorer.compute_score(*images(4))
    message = str(caught.value)
    assert message.startswith("METEOR (java -jar -Xmx2G")
    assert "made no progress (read no input, sent no reply) for 0.3 s after 0 of 4 replies" in message
    assert "SMILE_JAVA_TIMEOUT=SECONDS" in message and "--metrics without coco" in message and "-Xmx2G" in message
    assert_gone(scorer)  # killed at once, not at garbage collection
    with pytest.raises(RuntimeError, match="this MeteorScorer is closed"):
        scorer.compute_score(*images(1))
    scorer.close()  # idempotent


def test_a_stopped_jvm_is_killed_and_reaped(fake_java):
    fake_java("stop")
    gts, res = images(2000)  # more than the pipe holds: the writes block too, and must not hold anything
    scorer = MeteorScorer(processes=1, timeout=0.3)
    with pytest.raises(RuntimeError, match=r"made no progress .* after 0 of 2000 replies \(still running: killed"):
        scorer.compute_score(gts, res)
    assert_gone(scorer)
    assert scorer._procs[0].returncode == -signal.SIGKILL


def test_a_jvm_dying_mid_stream_is_one_error_with_its_exit_code_and_stderr(fake_java):
    fake_java("die:2")
    scorer = MeteorScorer(processes=1, timeout=600)
    (_, error) = run_bounded(lambda: scorer.compute_score(*images(5)))
    assert isinstance(error, RuntimeError)
    assert "METEOR (java -jar" in str(error) and "stopped after 2 of 5 replies" in str(error)
    assert "(exit code 3)" in str(error) and "JVM stderr: java.lang.OutOfMemoryError: Java heap space" in str(error)
    assert_gone(scorer)


def test_a_jvm_that_cannot_start_names_the_cause(fake_java):
    fake_java("nostart")
    with MeteorScorer(processes=2, timeout=600) as scorer:
        (_, error) = run_bounded(lambda: scorer.compute_score(*images(3)))
    assert isinstance(error, RuntimeError) and not isinstance(error, coco._Aborted)
    assert "(exit code 1)" in str(error) and "Unable to access jarfile" in str(error)
    assert_gone(scorer)


def test_one_failing_shard_stops_the_others_at_once(fake_java):
    fake_java("first-silent-others-die")  # one JVM never answers, the other dies after one reply
    scorer = MeteorScorer(processes=2, timeout=600)  # without the abort, the silent shard would wait 600 s
    (_, error) = run_bounded(lambda: scorer.compute_score(*images(6)))
    assert isinstance(error, RuntimeError) and not isinstance(error, coco._Aborted)  # the cause, not the echo
    assert "stopped after 1 of 3 replies" in str(error) and "OutOfMemoryError" in str(error)
    assert_gone(scorer)


def test_close_from_another_thread_ends_a_running_compute_score(fake_java):
    marks = fake_java("silent")
    scorer = MeteorScorer(processes=2, timeout=600)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(error=_raised(scorer.compute_score, *images(4))))
    thread.start()
    wait_for(marks / "got-a-line")  # compute_score is now waiting for replies that never come
    run_bounded(scorer.close)
    thread.join(120)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], coco._Aborted) and "the scorer was closed" in str(outcome["error"])
    assert_gone(scorer)


def _raised(fn, *args):
    try:
        fn(*args)
    except BaseException as error:  # noqa: BLE001 - the test looks at it
        return error
    return None


@pytest.mark.parametrize("processes", [1, 2])
def test_keyboard_interrupt_kills_every_jvm_and_thread(fake_java, processes):
    fake_java("interrupt")  # the first fake to read a line sends SIGUSR1 once; the handler raises KeyboardInterrupt

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        scorer = MeteorScorer(processes=processes, timeout=600)
        with pytest.raises(KeyboardInterrupt):
            scorer.compute_score(*images(4))  # blocks in poll (1 JVM) or in the wait for the shards (2 JVMs)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert_gone(scorer)


class _InterruptedBleu:
    def compute_score(self, *args, **kwargs):
        raise KeyboardInterrupt


def coco_inputs(n: int):
    """Results, GT and the ``tokens`` of every text, so coco_caption_metrics runs no PTB tokeniser (no Java)."""
    gt = {"images": [{"id": i} for i in range(n)],
          "annotations": [{"image_id": i, "caption": f"a cat on mat {i}"} for i in range(n)]}
    results = [{"image_id": i, "caption": f"h{i}"} for i in range(n)]
    texts = [r["caption"] for r in results] + [a["caption"] for a in gt["annotations"]]
    return results, gt, {t: t for t in texts}


def test_coco_caption_metrics_stops_a_borrowed_scorer_when_interrupted(fake_java, monkeypatch):
    fake_java("silent")
    monkeypatch.setattr(coco, "java_available", lambda: True)
    monkeypatch.setattr(coco, "Bleu", lambda n: _InterruptedBleu())  # Ctrl-C while METEOR runs in its thread
    results, gt, tokens = coco_inputs(3)
    scorer = MeteorScorer(processes=1, timeout=600)
    (_, error) = run_bounded(lambda: coco_caption_metrics(results, gt, meteor=scorer, tokens=tokens))
    assert isinstance(error, KeyboardInterrupt)
    assert_gone(scorer)  # METEOR was stopped, not left streaming (or waited for) in its thread


def test_coco_caption_metrics_raises_meteors_error_and_leaves_no_thread(fake_java, monkeypatch):
    fake_java("die:0")
    monkeypatch.setattr(coco, "java_available", lambda: True)
    results, gt, tokens = coco_inputs(3)
    (_, error) = run_bounded(lambda: coco_caption_metrics(results, gt, tokens=tokens))  # its own scorer
    assert isinstance(error, RuntimeError) and "METEOR (java" in str(error) and "stopped after 0 of 3" in str(error)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("meteor")]


def test_coco_caption_metrics_with_a_working_fake_scores_every_key(fake_java, monkeypatch):
    fake_java("answer")
    monkeypatch.setattr(coco, "java_available", lambda: True)
    results, gt, tokens = coco_inputs(3)
    scores = coco_caption_metrics(results, gt, tokens=tokens)
    assert scores["METEOR"] == 0.25 and set(scores) == {*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr"}
    assert not [t.name for t in threading.enumerate() if t.name.startswith("meteor")]


def test_ptb_tokenizer_is_killed_after_the_timeout(fake_java, monkeypatch):
    fake_java("silent")  # PTBTokenizer's place: never finishes
    monkeypatch.setenv(coco.JAVA_TIMEOUT_ENV, "0.5")
    with pytest.raises(RuntimeError, match=r"PTBTokenizer .* did not finish 2 captions within 0.5 s and was killed. "
                                           r".*SMILE_JAVA_TIMEOUT=SECONDS"):
        ptb_tokenize(["a dog", "a cat"])


def test_java_timeout_reads_the_environment_and_rejects_nonsense(monkeypatch):
    monkeypatch.delenv(coco.JAVA_TIMEOUT_ENV, raising=False)
    assert java_timeout() == coco.DEFAULT_JAVA_TIMEOUT == 600.0
    assert java_timeout(2) == 2.0
    monkeypatch.setenv(coco.JAVA_TIMEOUT_ENV, " 1800 ")
    assert java_timeout() == 1800.0
    assert java_timeout(5) == 5.0  # an explicit value wins
    for bad in ("ten", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(coco.JAVA_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"environment variable SMILE_JAVA_TIMEOUT='{bad}'"):
            java_timeout()
    with pytest.raises(ValueError, match="positive number of seconds"):
        MeteorScorer(processes=1, timeout=0)
