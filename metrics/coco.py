"""Accuracy metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and opt-in SPICE.

The numbers equal what pycocoevalcap's `COCOEvalCap` reports for the same results and ground
truth (tests/metrics/test_metrics_coco.py checks this), with three practical differences in *how* they are
obtained:

* Tokenisation runs Stanford's PTBTokenizer (the jar pycocoevalcap ships) once over candidates and
  references together, with its stderr captured and its temporary file in the system temp dir.
  pycocoevalcap's wrapper starts Java twice, prints, and writes into its own (possibly read-only)
  package directory. The command line and the punctuation filter are pycocoevalcap's.
* Output is quiet unless ``verbose``: the scorers' prints are redirected.
* METEOR runs pycocoevalcap's jar with pycocoevalcap's command line and input lines, through `MeteorScorer`:
  its JVMs start when it is created (loading the paraphrase table takes ~10 s of one core, so callers start it
  early: `coco_caption_metrics` before tokenising, `metrics.suite.MetricSession` while captions are generated),
  the per-image ``SCORE`` lines are streamed instead of sent one round trip at a time, optionally split over
  several JVMs, and the one ``EVAL`` line that turns the statistics into scores is pycocoevalcap's, so the
  scores are the same. BLEU, ROUGE-L and CIDEr run while METEOR's JVMs work. A JVM that dies, or makes no
  progress for `java_timeout()` seconds (``SMILE_JAVA_TIMEOUT``, default 600), is one RuntimeError naming METEOR,
  its stderr and what to do, and every JVM of that scorer is killed; nothing waits on a JVM forever.
* Without Java (`java_available()` is False) METEOR and SPICE cannot run. Then one warning says
  so, captions are tokenised by `fallback_tokenize`, a pure-Python imitation of PTBTokenizer +
  pycocoevalcap's punctuation filter, and only BLEU, ROUGE-L and CIDEr are returned. On ordinary
  caption text the fallback produces exactly the Java tokens (tested against the jar), so these
  three scores are unchanged.

All scores are in pycocoevalcap's 0-1 scale. CIDEr's document frequencies come from the
references of the scored images, so CIDEr depends on which images are scored.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from ._common import MetricInputError, read_json_file, usable_cores

if TYPE_CHECKING:
    from .suite import PreparationContext, ScoringContext

logger = logging.getLogger(__name__)

BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
COCO_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")
JAVA_FREE_KEYS = (*BLEU_KEYS, "ROUGE_L", "CIDEr")

# The tokens pycocoevalcap removes after PTB tokenisation (its own list, so both paths agree).
PTB_PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)
_PTB_JAR = Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
# PTBTokenizer runs with -preserveLines: one caption per line, so no caption may contain a break.
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]")
# pycocoevalcap's METEOR command line (`Meteor.__init__`), run in its package directory (the jar finds data/ there).
METEOR_COMMAND = ("java", "-jar", "-Xmx2G", meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm")
_METEOR_DIR = Path(meteor_module.__file__).parent
# Java helpers (METEOR's JVMs, PTBTokenizer) that make no progress for this long count as stuck (`java_timeout`).
JAVA_TIMEOUT_ENV = "SMILE_JAVA_TIMEOUT"
DEFAULT_JAVA_TIMEOUT = 600.0
_WAKE_S = 0.5  # a METEOR exchange checks this often whether to give up (`MeteorScorer.close`, a failed shard)
_READ_CHUNK = _WRITE_CHUNK = 1 << 16
# redirect_stdout swaps the process-wide sys.stdout; two threads doing it at once could leave it swapped.
_STDOUT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """True when a `java` executable is on PATH and ``java -version`` runs successfully.

    Cached: the answer does not change within a process, and the probe starts a JVM.
    """
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:  # not "not found": say why METEOR is about to be skipped
        logger.warning("`%s -version` did not finish within 60 s (an overloaded machine?): treating Java as absent",
                       java)
        return False
    except (OSError, subprocess.SubprocessError):
        return False


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------
def ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Tokenise with Stanford PTBTokenizer exactly as pycocoevalcap does, then drop its punctuation.

    Same command (``-preserveLines -lowerCase``) and same filter as
    `pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`; line breaks inside a caption become spaces. A run longer
    than `java_timeout()` seconds (``SMILE_JAVA_TIMEOUT``, default 600) is killed and raises RuntimeError.

    Returns:
        One space-joined token string per input caption, in input order.
    """
    lines = [_LINE_BREAKS.sub(" ", c) for c in captions]
    timeout = java_timeout()
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(lines))
    try:
        proc = subprocess.run(
            ["java", "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8", handle.name],
            capture_output=True, timeout=timeout,  # on expiry the JVM is killed and reaped
        )
    except subprocess.TimeoutExpired as error:
        stderr = (error.stderr or b"").decode("utf-8", "replace").strip()[-2000:] or "(empty)"
        raise RuntimeError(
            f"Stanford PTBTokenizer ({_PTB_JAR}) did not finish {len(lines)} captions within {timeout:g} s and was "
            f"killed. A loaded machine can be this slow: allow more with {JAVA_TIMEOUT_ENV}=SECONDS. "
            f"Its stderr: {stderr}"
        ) from None
    finally:
        os.remove(handle.name)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Stanford PTBTokenizer ({_PTB_JAR}) failed with exit code {proc.returncode}: "
            f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}"
        )
    out = proc.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [_drop_punctuation(line.rstrip().split(" ")) for line in out[: len(lines)]]


def tokenize_texts(texts: Sequence[str], java: bool | None = None) -> dict[str, str]:
    """``{text: tokens}`` for each distinct text: `ptb_tokenize` with Java, else `fallback_tokenize`.

    PTBTokenizer runs with ``-preserveLines``, one text per line, and tokenises each line on its own, so texts can
    be tokenised in any grouping (pycocoevalcap itself tokenises references and candidates in two runs); each
    distinct text is tokenised once. `java`: None asks `java_available()`.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    java = java_available() if java is None else java
    tokens = ptb_tokenize(unique) if java else [fallback_tokenize(t) for t in unique]
    return dict(zip(unique, tokens))


_CONTRACTIONS = re.compile(r"\b(cannot|gonna|gotta|wanna|gimme|lemme)\b")
_CONTRACTION_SPLIT = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta",
                      "wanna": "wan na", "gimme": "gim me", "lemme": "lem me"}
_NEGATION = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_FALLBACK_TOKEN = re.compile(
    r"""
      n't\b | '(?:s|re|ve|ll|d|m)\b                                  # clitics split off above
    | (?<!\w)(?:[^\W\d_]\.){2,}(?!\w)                                # acronyms: u.s.a. e.g. a.m.
    | (?<!\w)(?:mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|mt|no)\.(?!\w)      # abbreviations keep the period
    | (?<![\w.])[^\W\d_]\.(?!\w)                                     # an initial: "c."
    | \#[^\W\d_]\w*                                                  # hashtags stay whole
    | \w+(?:(?:[-.'/@]|(?<=\d)[,:](?=\d))\w+)*                       # words: man-made 3.5 1,000 10:30
    | \.{2,} | -+ | [!?]+ | `+ | '+ | "                              # punctuation runs
    | \S                                                             # any other symbol on its own
    """,
    re.VERBOSE,
)
# PTB escapes brackets; pycocoevalcap's filter lists them upper-case, so after -lowerCase they stay.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def fallback_tokenize(caption: str) -> str:
    """Pure-Python stand-in for PTBTokenizer + pycocoevalcap's punctuation filter (no Java needed).

    Reproduces what PTB does to caption text: lower-case; split clitics (``man's`` -> ``man 's``,
    ``isn't`` -> ``is n't``, ``cannot`` -> ``can not``); split punctuation off words but keep it
    inside numbers (``3.5``, ``1,000``, ``10:30``), hyphenated words, acronyms (``u.s.``), common
    abbreviations (``mr.``, ``etc.``) and initials; brackets become ``-lrb-`` etc. (which survive
    pycocoevalcap's upper-case filter, as they do with Java); then drop pycocoevalcap's punctuation
    tokens. Known differences from the jar, all rare in captions: PTB's longer abbreviation list,
    ``y'all``/``'tis``/``'90s``, HTML entities other than ``&amp;``, digit-letter splits such as
    ``1.5x``, and SGML tags.
    """
    text = _LINE_BREAKS.sub(" ", caption).lower().replace("&amp;", "&")
    text = _CONTRACTIONS.sub(lambda m: _CONTRACTION_SPLIT[m.group(1)], text)
    text = _CLITIC.sub(r" '\1", _NEGATION.sub(" n't", text))
    tokens = _FALLBACK_TOKEN.findall(text)
    return _drop_punctuation(_fallback_canonical(t) for t in tokens)


def _fallback_canonical(token: str) -> str:
    """The form PTB gives a token: escaped brackets, quotes as '', dot runs as an ellipsis."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    if set(token) <= {"'", "`", '"'}:
        return "''"
    return "..." if token.startswith("..") else token


def _drop_punctuation(tokens) -> str:
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)


# ---------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------
def default_meteor_processes() -> int:
    """One METEOR JVM per 4 usable cores, 1 to 4: each holds the paraphrase table (~1 GB resident) and costs
    ~10 s of one core to start, so more only pay where cores are idle (a GPU host evaluating)."""
    return max(1, min(4, usable_cores() // 4))


def java_timeout(timeout: float | None = None) -> float:
    """Seconds a Java helper (a METEOR JVM, the PTB tokeniser) may go without progress before it counts as stuck.

    `timeout` if given, else the environment variable `JAVA_TIMEOUT_ENV` (``SMILE_JAVA_TIMEOUT``), else
    `DEFAULT_JAVA_TIMEOUT` (600 s). The default is a hang detector, not a budget: a METEOR JVM needs ~10 s of one
    core to load its paraphrase table before its first reply, which on a 2-core machine shared with several jobs
    (or swapping with its 2 GB heap) can stretch to minutes, and a slow but working evaluation must never fail.
    Raises ValueError naming the variable for a value that is not a positive number.
    """
    source = "timeout"
    if timeout is None:
        raw = os.environ.get(JAVA_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_JAVA_TIMEOUT
        source = f"environment variable {JAVA_TIMEOUT_ENV}={raw!r}"
        try:
            timeout = float(raw)
        except ValueError:
            timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):  # also catches NaN
        raise ValueError(f"{source}: the Java timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def meteor_score_line(hypothesis: str, references: Sequence[str]) -> str:
    """The ``SCORE`` line pycocoevalcap's `Meteor._stat` sends for one image (same clean-up of the hypothesis)."""
    hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
    return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis))


class MeteorScorer:
    """METEOR 1.5 as pycocoevalcap computes it, with its JVMs started at construction.

    Same jar, command line (`METEOR_COMMAND`), ``SCORE`` lines and final ``EVAL`` line as
    `pycocoevalcap.meteor.meteor.Meteor`, so `compute_score` returns the same ``(corpus score, per-image
    scores)``. What differs is only how the lines travel: pycocoevalcap waits for each image's reply before
    sending the next line (one round trip per image, ~3 ms); here the lines are streamed while the replies are
    read, and with ``processes > 1`` the images are split into contiguous shards scored by separate JVMs. Each
    ``SCORE`` line is answered from that line alone (its matching statistics), so which JVM answers it changes
    nothing; the statistics are then sent, in image order, in one ``EVAL`` line to the first JVM, which computes
    the scores exactly as in pycocoevalcap.

    A JVM spends ~10 s (one core) loading the paraphrase table before its first answer. Construct the scorer
    early (before tokenising, or while captions are generated) so that this overlaps other work; `close` (or
    ``with``) stops the JVMs, as does garbage collection.

    Failures come fast and whole. Each JVM is talked to through its pipes' raw file descriptors, polled with a
    timeout (no thread blocks in a read or a write that may never return), so `compute_score` raises one
    RuntimeError naming METEOR, the JVM's state and the tail of its stderr when a JVM exits or closes its output
    (killed, out of memory, a missing jar), or when it makes no progress, reading nothing and answering nothing,
    for `timeout` seconds (a JVM that hangs, or is stopped). Any failure or interrupt (KeyboardInterrupt included)
    inside `compute_score` kills every JVM of the scorer, whose streams are then mid-reply, and closes it; so does
    `close` from another thread while `compute_score` runs, which then raises within `_WAKE_S` seconds.

    Args:
        processes: JVMs to start; None: `default_meteor_processes`.
        timeout: seconds without progress after which a JVM counts as stuck; None: `java_timeout()` (the
            ``SMILE_JAVA_TIMEOUT`` environment variable, else 600 s, generous enough for a loaded machine).
    """

    def __init__(self, processes: int | None = None, timeout: float | None = None):
        count = default_meteor_processes() if processes is None else int(processes)
        if count < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.timeout = java_timeout(timeout)
        self._lock = threading.Lock()  # one compute_score at a time: the JVMs' streams are shared
        self._abort = threading.Event()  # set by close() or a failure: in-flight exchanges give up
        self._procs: list[subprocess.Popen] = []
        self._errs = []
        try:
            for _ in range(count):
                err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty JVM can never block on it
                self._errs.append(err)
                self._procs.append(subprocess.Popen(list(METEOR_COMMAND), cwd=_METEOR_DIR, stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=err))
                # Writes go straight to the fd without blocking (a JVM that stops reading cannot hold a writer).
                os.set_blocking(self._procs[-1].stdin.fileno(), False)
        except BaseException:
            _stop_processes(self._procs, self._errs)
            raise
        self._channels = [_Channel(proc, err) for proc, err in zip(self._procs, self._errs)]
        self._finalizer = weakref.finalize(self, _stop_processes, list(self._procs), list(self._errs))

    @property
    def processes(self) -> int:
        return len(self._procs)

    def compute_score(self, gts: Mapping, res: Mapping) -> tuple[float, list[float]]:
        """pycocoevalcap's ``Meteor.compute_score``: `gts` ``{id: [reference tokens]}``, `res` ``{id: [tokens]}``
        with the same keys (one hypothesis each); returns ``(score, [per-image score in gts order])``.

        Raises RuntimeError (see the class docstring) when a JVM fails or stalls; the scorer is closed then."""
        if gts.keys() != res.keys():
            raise ValueError("METEOR needs the same image ids in gts and res")
        ids = list(gts)
        if not ids:
            raise ValueError("METEOR needs at least one image")
        for i in ids:
            if len(res[i]) != 1:
                raise ValueError(f"METEOR needs exactly one hypothesis per image; image {i!r} has {len(res[i])}")
        lines = [meteor_score_line(res[i][0], gts[i]) for i in ids]
        with self._lock:
            if not self._procs or not self._finalizer.alive or self._abort.is_set():
                raise RuntimeError("this MeteorScorer is closed")
            try:
                stats = self._score_lines(lines)
                eval_line = "EVAL" + "".join(f" ||| {s}" for s in stats)
                replies = self._ask(self._channels[0], [eval_line], replies=len(ids) + 1)
            except BaseException:
                self._abort.set()  # the JVMs are mid-stream: nothing more can be asked of them
                self._finalizer()
                raise
        return float(replies[-1]), [float(r) for r in replies[:-1]]

    def _score_lines(self, lines: list[str]) -> list[str]:
        """The statistics line of each ``SCORE`` line, in order: one contiguous shard per JVM, each asked from its
        own thread. The first shard to fail stops the others (they give up within `_WAKE_S`), and its error is the
        one raised; the pool's threads have all ended when this returns or raises."""
        size = -(-len(lines) // len(self._channels))  # ceil: contiguous shards, the last one shorter
        shards = [(channel, lines[start:start + size])
                  for channel, start in zip(self._channels, range(0, len(lines), size))]
        if len(shards) == 1:
            return self._ask(*shards[0])
        pool = ThreadPoolExecutor(len(shards), thread_name_prefix="meteor")
        try:
            futures = [pool.submit(self._ask, *shard) for shard in shards]
            done, _ = futures_wait(futures, return_when=FIRST_EXCEPTION)
            if any(future.exception() is not None for future in done):
                self._abort.set()
                futures_wait(futures)
                errors = [future.exception() for future in futures if future.exception() is not None]
                raise next((e for e in errors if not isinstance(e, _Aborted)), errors[0])
            return [stat for future in futures for stat in future.result()]
        except BaseException:
            self._abort.set()  # e.g. KeyboardInterrupt while waiting: the shards' threads end within _WAKE_S
            raise
        finally:
            pool.shutdown(wait=True)

    def _ask(self, channel: _Channel, lines: list[str], replies: int | None = None) -> list[str]:
        return _ask(channel, lines, replies, self.timeout, self._abort)

    def method(self) -> str:
        return "METEOR"

    def close(self) -> None:
        """Stop the JVMs (idempotent, from any thread: a `compute_score` running meanwhile raises promptly)."""
        self._abort.set()
        for proc in self._procs:  # a running exchange now reads the end of its JVM's output
            with contextlib.suppress(OSError):
                proc.kill()
        with self._lock:  # the pipes are closed only once no exchange uses them
            self._finalizer()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Aborted(RuntimeError):
    """A METEOR exchange given up because another shard failed or the scorer was closed (not the cause itself)."""


class _Channel:
    """One METEOR JVM: its process, its stderr file, and the bytes read after its last complete reply line."""

    def __init__(self, proc: subprocess.Popen, err):
        self.proc, self.err = proc, err
        self.buffer = bytearray()

    def stderr_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.err.flush()
            self.err.seek(0)
            text = self.err.read().decode("utf-8", "replace").strip()
            return text[-chars:] if text else "(empty)"
        return "(unreadable)"


def _ask(channel: _Channel, lines: list[str], replies: int | None, timeout: float,
         abort: threading.Event) -> list[str]:
    """Send `lines` to a METEOR JVM while reading its replies (one per line by default); the reply lines, stripped.

    One thread, no blocking call: the pipes' raw fds are polled (epoll where there is one, so any fd number works)
    at most `_WAKE_S` seconds at a time. Python's buffered ``proc.stdout`` is never read (its buffer would hide
    bytes from the poll); bytes past the last expected reply stay in ``channel.buffer``. Raises RuntimeError when
    the JVM closes its output first (it exited or was killed), when neither a byte is written to it nor one read
    from it for `timeout` seconds, or (`_Aborted`) when `abort` is set.
    """
    expected = len(lines) if replies is None else replies
    proc = channel.proc
    data = memoryview("".join(f"{line}\n" for line in lines).encode())
    out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
    out: list[str] = []
    write_error: OSError | None = None
    last_progress = time.monotonic()

    def take_lines() -> None:  # the complete lines still expected move from channel.buffer to out
        if b"\n" not in channel.buffer:
            return
        *complete, rest = bytes(channel.buffer).split(b"\n")
        need = expected - len(out)
        out.extend(line.decode("utf-8", "replace").strip() for line in complete[:need])
        channel.buffer[:] = b"\n".join([*complete[need:], rest])

    take_lines()
    with selectors.DefaultSelector() as selector:
        selector.register(out_fd, selectors.EVENT_READ)
        if data:
            selector.register(in_fd, selectors.EVENT_WRITE)
        while len(out) < expected:
            if abort.is_set():
                raise _aborted(len(out), expected)
            idle = time.monotonic() - last_progress
            if idle >= timeout:
                raise _meteor_error(channel, f"made no progress (read no input, sent no reply) for {timeout:g} s "
                                    f"after {len(out)} of {expected} replies", stuck=True)
            for key, _ in selector.select(min(_WAKE_S, timeout - idle)):
                if key.fd == in_fd:
                    try:
                        written = os.write(in_fd, data[:_WRITE_CHUNK])
                    except BlockingIOError:
                        continue
                    except OSError as error:  # the JVM is gone; its output's end says so just below
                        write_error, written, data = error, 0, data[:0]
                    data = data[written:]
                    last_progress = time.monotonic() if written else last_progress
                    if not data:
                        selector.unregister(in_fd)
                    continue
                chunk = os.read(out_fd, _READ_CHUNK)
                if not chunk and abort.is_set():  # killed by `MeteorScorer.close` or after another JVM's failure
                    raise _aborted(len(out), expected)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)  # it closed its output: let it finish dying, for its exit code
                    cause = f" (writing to it: {write_error!r})" if write_error is not None else ""
                    raise _meteor_error(channel, f"stopped after {len(out)} of {expected} replies{cause}")
                channel.buffer += chunk
                last_progress = time.monotonic()
                take_lines()
    return out


def _aborted(replies: int, expected: int) -> _Aborted:
    return _Aborted(f"METEOR ({' '.join(METEOR_COMMAND)}) was stopped after {replies} of {expected} replies: "
                    "another METEOR JVM failed, or the scorer was closed")


def _meteor_error(channel: _Channel, what: str, stuck: bool = False) -> RuntimeError:
    """One RuntimeError naming METEOR's command, what went wrong, the JVM's state, what to do, and its stderr."""
    code = channel.proc.poll()
    state = "still running: killed now" if code is None else f"exit code {code}"
    advice = (f"A loaded machine can be this slow: allow more with {JAVA_TIMEOUT_ENV}=SECONDS (or MeteorScorer("
              "timeout=...)). " if stuck else "")
    advice += ("Each METEOR JVM needs ~2 GB of memory (-Xmx2G): free memory or start fewer JVMs (meteor_processes), "
               "or score without METEOR by leaving the 'coco' group out (eval_caption.py --metrics without coco).")
    return RuntimeError(f"METEOR ({' '.join(METEOR_COMMAND)}) {what} ({state}). {advice} "
                        f"JVM stderr: {channel.stderr_tail()}")


def _stop_processes(procs: list[subprocess.Popen], errs: list) -> None:
    """Kill the JVMs, reap them and close their pipes and stderr files (the scorer's finalizer: idempotent)."""
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) JVM
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # not reaped yet (uninterruptible I/O); the kernel will finish it
            logger.warning("METEOR JVM pid %d did not exit within 60 s of SIGKILL", proc.pid)
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe is not None:
                    pipe.close()
    for err in errs:
        err.close()


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------
def read_coco_gt(gt: dict | str | Path) -> tuple[dict, str]:
    """Load COCO-caption-format ground truth and check its shape.

    Args:
        gt: a dict ``{"images": [{"id", ...}], "annotations": [{"image_id", "caption"}, ...]}`` or
            the path of a JSON file holding one.

    Returns:
        ``(gt_dict, name)``; `name` is the file path (or ``"<ground-truth dict>"``) for messages.
    """
    if isinstance(gt, (str, Path)):
        name = str(gt)
        gt = read_json_file(gt, "ground-truth annotation file")
    else:
        name = "<ground-truth dict>"
    if not isinstance(gt, dict):
        raise MetricInputError(f"{name}: expected a COCO caption dict with 'images' and 'annotations', "
                         f"got a {type(gt).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(gt.get(key), list):
            raise MetricInputError(f"{name}: COCO caption ground truth needs a list under '{key}' "
                             f"(found keys: {sorted(gt)})")
    for i, image in enumerate(gt["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise MetricInputError(f"{name}: images[{i}] has no 'id': {image!r}")
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise MetricInputError(f"{name}: annotations[{i}] needs 'image_id' and a str 'caption': {ann!r}")
    return gt, name


def references_by_image(gt: dict) -> dict[Hashable, list[str]]:
    """``{image_id: [reference captions]}`` for every image in ``gt["images"]`` (possibly [])."""
    refs: dict[Hashable, list[str]] = {image["id"]: [] for image in gt["images"]}
    for ann in gt["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def coco_caption_metrics(
    results: Sequence[dict],
    gt: dict | str | Path,
    spice: bool = False,
    verbose: bool = False,
    meteor: MeteorScorer | None = None,
    tokens: Mapping[str, str] | None = None,
    overlap: bool = True,
    timings: dict[str, float] | None = None,
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE if asked) of `results` against `gt`.

    Args:
        results: ``[{"image_id": id, "caption": str}, ...]``, one entry per image.
        gt: COCO caption ground truth, a dict or a JSON path (see `read_coco_gt`).
        spice: also compute SPICE. pycocoevalcap downloads Stanford CoreNLP models for it on first
            use, and it needs Java and several GB of memory.
        verbose: let pycocoevalcap print its progress.
        meteor: a `MeteorScorer` started earlier (its JVMs may have loaded meanwhile); the caller closes it, except
            that an error or interrupt while it scores closes it here (its JVMs are then mid-stream; see
            `MeteorScorer`). None: one is started here, before tokenising, and closed at the end.
        tokens: ``{text: tokens}`` from `tokenize_texts` with the same Java setting, e.g. the references
            tokenised while the captions were generated; the other texts are tokenised here.
        overlap: score METEOR (in its JVMs) while BLEU, ROUGE-L and CIDEr run in this thread; False runs them
            one after the other, in pycocoevalcap's order. The scores are the same.
        timings: if given, filled with wall seconds: ``coco_tokenize``, ``bleu``, ``meteor`` (with overlap,
            including the wait for the JVM), ``rouge``, ``cider`` (and ``spice``).

    Scored images are those in results ∩ GT, as with COCOEvalCap; result ids absent from the GT
    are named in a warning and skipped (`metrics.suite` turns that into an error before getting
    here). A scored image without any reference caption is an error.

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}`` as floats in 0-1; without
        Java only ``Bleu_1..4, ROUGE_L, CIDEr``.
    """
    gt, gt_name = read_coco_gt(gt)
    refs = references_by_image(gt)
    candidates: dict[Hashable, str] = {}
    for i, entry in enumerate(results):
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise MetricInputError(f"results[{i}] needs 'image_id' and a str 'caption': {entry!r}")
        if entry["image_id"] in candidates:
            raise MetricInputError(f"results hold image_id {entry['image_id']!r} more than once; "
                             "COCO caption metrics need one caption per image")
        candidates[entry["image_id"]] = entry["caption"]
    ids = [i for i in candidates if i in refs]
    unknown = [i for i in candidates if i not in refs]
    if unknown:
        logger.warning("coco_caption_metrics: %d result image ids are not in %s and are not scored "
                       "(first: %s)", len(unknown), gt_name, unknown[:5])
    if not ids:
        raise MetricInputError(f"no result image_id is in {gt_name}; nothing to score")
    without_refs = [i for i in ids if not refs[i]]
    if without_refs:
        raise MetricInputError(f"{gt_name}: {len(without_refs)} scored images have no reference caption "
                         f"(first: {without_refs[:5]})")

    java = java_available()
    if not java:
        skipped = "METEOR and SPICE" if spice else "METEOR"
        logger.warning(
            "Java was not found (needed by pycocoevalcap's PTBTokenizer, METEOR and SPICE): %s skipped; "
            "tokenising with the pure-Python PTB fallback and reporting BLEU, ROUGE_L and CIDEr only. "
            "Install a Java runtime (>= 8) for the full set.", skipped,
        )
    timings = {} if timings is None else timings
    own_meteor = None
    if java and meteor is None and overlap:
        meteor = own_meteor = MeteorScorer()  # its JVMs load the paraphrase table while we tokenise
    try:
        with _timed(timings, "coco_tokenize"):
            texts = [candidates[i] for i in ids] + [r for i in ids for r in refs[i]]
            known = tokens or {}
            by_text = {**known, **tokenize_texts([t for t in texts if t not in known], java)}
        res_tok = {i: [by_text[candidates[i]]] for i in ids}
        gts_tok = {i: [by_text[r] for r in refs[i]] for i in ids}

        scores: dict[str, float] = {}
        pending = None
        if java and overlap:
            pending = ThreadPoolExecutor(1, thread_name_prefix="meteor")
            meteor_future = pending.submit(_timed_call, timings, "meteor", meteor.compute_score, gts_tok, res_tok)
        try:
            with _timed(timings, "bleu"):
                bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=int(verbose))  # verbose=0 prints nothing
            scores.update(zip(BLEU_KEYS, map(float, bleu)))
            if java and not overlap:
                if meteor is None:
                    meteor = own_meteor = MeteorScorer()
                scores["METEOR"] = float(_timed_call(timings, "meteor", meteor.compute_score, gts_tok, res_tok)[0])
            with _timed(timings, "rouge"):
                scores["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
            with _timed(timings, "cider"):
                scores["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
            if pending is not None:
                scores["METEOR"] = float(meteor_future.result()[0])
        except BaseException:
            if pending is not None and not meteor_future.done():
                meteor.close()  # an error or interrupt here: stop METEOR mid-stream rather than wait for it
            raise
        finally:
            if pending is not None:
                pending.shutdown(wait=True)  # METEOR has returned or been stopped: no thread outlives this call
        if spice and java:
            with _timed(timings, "spice"):
                scores["SPICE"] = _spice(gts_tok, res_tok, verbose)
    finally:
        if own_meteor is not None:
            own_meteor.close()
    return {key: scores[key] for key in (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr", "SPICE") if key in scores}


# ---------------------------------------------------------------------------------------------
# The "coco" metric group (metrics/registry.py); it also writes SPICE when the "spice" group is asked for
# ---------------------------------------------------------------------------------------------
@dataclass
class PreparedCoco:
    """What `prepare_coco_group` starts before the captions exist: the references' tokens and METEOR's JVMs."""

    tokens: dict[str, str]
    meteor: MeteorScorer | None

    def close(self) -> None:
        if self.meteor is not None:
            self.meteor.close()


def prepare_coco_group(ctx: PreparationContext) -> PreparedCoco:
    """Start METEOR's JVMs (they load the paraphrase table while the rest runs) and PTB-tokenise the references
    of ``ctx.ids``."""
    java = java_available()
    meteor = MeteorScorer(ctx.options.meteor_processes) if java else None
    try:
        with ctx.timed("coco_tokenize"):
            tokens = tokenize_texts([r for i in ctx.ids for r in ctx.references.get(i, ())], java)
    except BaseException:
        if meteor is not None:
            meteor.close()
        raise
    return PreparedCoco(tokens, meteor)


def score_coco_group(ctx: ScoringContext) -> dict[str, float | None]:
    """`coco_caption_metrics` of the scored captions, with what `prepare_coco_group` prepared; every `COCO_KEYS`
    key (METEOR None without Java), plus SPICE when the "spice" group is asked for."""
    prepared = ctx.prepared("coco")
    timings: dict[str, float] = {}
    spice = "spice" in ctx.groups
    scores = coco_caption_metrics([{"image_id": i, "caption": c} for i, c in ctx.scored], ctx.gt, spice=spice,
                                  verbose=ctx.options.verbose, meteor=prepared.meteor if prepared else None,
                                  tokens=prepared.tokens if prepared else None, overlap=ctx.options.overlap,
                                  timings=timings)
    ctx.add_timings(timings)
    return {key: scores.get(key) for key in COCO_KEYS + (("SPICE",) if spice else ())}


def _timed_call(timings: dict, name: str, fn, *args):
    with _timed(timings, name):
        return fn(*args)


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _spice(gts_tok: dict, res_tok: dict, verbose: bool = False) -> float:
    from pycocoevalcap.spice import spice as spice_module

    try:
        # Only SPICE prints from Python (its first-use download); the lock keeps two threads from swapping
        # sys.stdout at once, which could leave it swapped.
        with _STDOUT_LOCK, (contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())):
            return float(spice_module.Spice().compute_score(gts_tok, res_tok)[0])
    except Exception as err:  # download, Java version or memory problems all surface here
        raise RuntimeError(
            "SPICE failed. It needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use "
            f"into {Path(spice_module.__file__).parent / 'lib'}, plus Java and ~8 GB of memory "
            f"(the jar runs with -Xmx8G). Cause: {type(err).__name__}: {err}"
        ) from err
