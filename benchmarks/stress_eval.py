"""Stress the evaluation overlap: a metrics session's background work while the main thread iterates a loader.

    python benchmarks/stress_eval.py                          # 20 sessions or 300 s, whichever comes first
    python benchmarks/stress_eval.py --load 4 --java          # 4 busy processes beside it, METEOR's JVMs too

What it guards against: evaluation after training once crashed with ``RuntimeError: DataLoader worker (pid N) exited
unexpectedly with exit code 1`` raised in the main thread, and later hung, while the metrics session
(metrics/suite.py) encoded the GT images in a ThreadPoolExecutor thread: both came from image-decoding worker
processes forked from that thread (metrics/clip_metrics.py `_pixel_batches` now decodes in threads). Each iteration
here does what training.evaluate_split does, with the tests' tiny CLIP and GPT-2 and generated images:
``prepare_metrics`` (CLIP's image encoding with 2 decoding threads starts in a background thread), then the main
thread iterates a ``num_workers=0`` loader doing CPU work (the captioner's place), then ``session.score`` and
``close``.

Two conditions of the failed runs are reproduced: torch's SIGCHLD handler is installed, as it is once any loader
with workers has been iterated in the main thread (a training loader), unless ``--no-handler``; and ``--load K``
keeps K busy processes beside it (the runs shared 2 cores with 4-7 jobs). A session that takes longer than
``--session-limit`` seconds is a hang: every thread's stack is printed and the script exits at once (faulthandler).

Printed: the machine, then per iteration the outcome, and at the end the number of sessions whose main thread got
the worker error and other errors. It stops by itself after ``--iterations`` sessions or ``--time-limit`` seconds
(the running session finishes first), and stops its busy processes on the way out.
"""
from __future__ import annotations

import argparse
import faulthandler
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import torch  # noqa: E402

from machine import describe_machine  # noqa: E402
from metrics import MetricOptions, java_available, prepare_metrics  # noqa: E402
from metrics_fixtures import build_tiny_clip, build_tiny_gpt2, make_images, synthetic_coco  # noqa: E402

WORKER_ERROR = "exited unexpectedly"


def _busy(stop) -> None:
    """A CPU-bound job sharing the cores (pure Python: it holds one core the whole time)."""
    while not stop.is_set():
        sum(i * i for i in range(20_000))


def install_sigchld_handler() -> None:
    """What a training loader with workers does in the main thread: iterating it installs torch's process-wide
    SIGCHLD handler (torch.utils.data._utils.signal_handling)."""
    for _ in torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=2):
        pass


def one_session(gt: dict, results: list[dict], groups: list[str], options: MetricOptions,
                work_seconds: float) -> None:
    """training.evaluate_split's shape: prepare, 'generate' in this thread, score, close."""
    with prepare_metrics(gt, groups, options) as session:
        x = torch.randn(128, 128)
        end = time.perf_counter() + work_seconds
        while time.perf_counter() < end:  # the captioner's place: a loader without workers, CPU work per batch
            for _ in torch.utils.data.DataLoader(list(range(32)), batch_size=4, num_workers=0):
                x = torch.tanh(x @ x)
        session.score(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20, help="metrics sessions to run (at most)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="stop starting sessions after this many s")
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside it")
    parser.add_argument("--images", type=int, default=100, help="GT images (more than 64: the loader gets workers)")
    parser.add_argument("--work", type=float, default=1.5, help="seconds of main-thread work per session")
    parser.add_argument("--java", action="store_true", help="score the COCO group too (METEOR's JVMs, PTB "
                        "tokeniser and the COCO thread), if Java is installed")
    parser.add_argument("--no-handler", action="store_true", help="do not install torch's SIGCHLD handler first")
    parser.add_argument("--session-limit", type=float, default=600.0, help="seconds after which a session counts "
                        "as hung (every stack printed, then exit)")
    args = parser.parse_args(argv)
    java = args.java and java_available()
    groups = ["length", "ppl", "retrieval", "clipscore"] + (["coco"] if java else [])

    print(f"machine: {describe_machine(extras=(f'java {java}',))}")
    print(f"settings: {args.iterations} sessions at most, {args.time_limit:.0f} s limit, {args.load} busy processes, "
          f"{args.images} images, groups {groups}, SIGCHLD handler {'no' if args.no_handler else 'yes'}, "
          f"{args.session_limit:.0f} s per session at most", flush=True)
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(args.load)]
    outcomes = {"ok": 0, "worker error": 0, "other error": 0}
    with tempfile.TemporaryDirectory(prefix="stress_eval_") as tmp:
        work = Path(tmp)
        clip_dir, gpt2_dir = build_tiny_clip(work / "clip"), build_tiny_gpt2(work / "gpt2")
        names = make_images(work / "images", args.images, seed=3)
        gt, results = synthetic_coco(args.images, file_names=names, seed=5)
        options = MetricOptions(images_root=work / "images", clip_model=clip_dir, ppl_model=gpt2_dir, progress=False)
        if not args.no_handler:
            install_sigchld_handler()
        for burner in burners:
            burner.start()
        start = time.perf_counter()
        try:
            for iteration in range(args.iterations):
                if time.perf_counter() - start > args.time_limit:
                    print(f"time limit reached after {iteration} sessions")
                    break
                faulthandler.dump_traceback_later(args.session_limit, exit=True)  # a hang: stacks, then exit
                try:
                    one_session(gt, results, groups, options, args.work)
                    outcome, detail = "ok", ""
                except RuntimeError as error:
                    outcome = "worker error" if WORKER_ERROR in str(error) else "other error"
                    detail = f": {str(error).splitlines()[0][:160]}"
                faulthandler.cancel_dump_traceback_later()
                outcomes[outcome] += 1
                print(f"session {iteration}: {outcome}{detail} ({time.perf_counter() - start:.0f} s)", flush=True)
        finally:
            stop.set()
            for burner in burners:
                burner.join(timeout=10)
                if burner.is_alive():
                    burner.terminate()
    sessions = sum(outcomes.values())
    print(f"\nsessions {sessions}: ok {outcomes['ok']}, main thread got the worker error {outcomes['worker error']}, "
          f"other errors {outcomes['other error']}")
    return 1 if outcomes["worker error"] or outcomes["other error"] else 0


if __name__ == "__main__":
    sys.exit(main())
