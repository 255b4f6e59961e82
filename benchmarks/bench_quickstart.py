"""The README quickstart end to end, from a clean cache: as written, and with OMP_NUM_THREADS=1 (the baseline).

    python benchmarks/bench_quickstart.py --load 2                 # the full quickstart on a loaded machine
    python benchmarks/bench_quickstart.py --quick --load 2         # 1 epoch each: ~9 min a leg at load 10-13, 2 CPUs

Each leg copies the checkout's files (tracked and untracked, not ignored: the working tree as it is, without
cache/ or runs/) into its own temporary folder and runs ``bash scripts/train.sh configs/toy/smile.yaml`` there,
so every cache the toy flow builds (cache/toy, cache/toy_clip, cache/toy_gpt2, cache/toy_pretrain,
cache/features) and runs/ start empty. The "as written" leg runs without OMP_NUM_THREADS / MKL_NUM_THREADS in
its environment (the project chooses its threads, utils.configure_cpu_threads); the baseline sets
OMP_NUM_THREADS=1. With ``--repeats`` > 1 the legs alternate and the median is reported.

``--load N`` starts N busy Python processes (at most 4 per usable CPU) before the legs and waits
``--load-warmup`` seconds so the 1-minute load average, which the thread policy reads at start-up, sees them;
they are killed at the end, and each also exits by itself after ``--load-limit`` seconds should the benchmark
die. Without it, the machine's own load is all there is (printed with the machine line).

``--quick`` edits the copies: configs/toy/pretrain.yaml trains 1 epoch, the fine-tune 1 epoch without
validation (train.epochs=1 train.validate=false; the test after training stays), the toy CLIP 3 epochs instead
of 30 (toy_pretrained/clip.py's recipe default). It checks the benchmark, not the timing target.

Printed: the machine, the load average before each leg, each leg's wall time, the thread decision it logged,
its stages (toy data, toy CLIP and toy GPT-2 as their builders report them; pre-training from its first to the
fine-tune's "objective" log line; fine-tune and test from there to the end), and the ratio as written /
OMP_NUM_THREADS=1 (the target: at most 1.3 on a loaded machine).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from machine import describe_machine  # noqa: E402

CONFIG = "configs/toy/smile.yaml"
TARGET = 1.3
BUSY = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"
# (stage, pattern): a builder's own "built ... in S s", whose S is the stage's time.
BUILT = (("toy data", re.compile(r"built toy dataset \S+ in ([\d.]+) s")),
         ("toy CLIP", re.compile(r"built \S*toy_clip in ([\d.]+) s")),
         ("toy GPT-2", re.compile(r"built \S*toy_gpt2 in ([\d.]+) s")))
OBJECTIVE = re.compile(r"INFO objective ")
PRETRAIN = re.compile(r"does not exist: training \S+ first")
THREADS = re.compile(r"CPU threads: (.*)")


def copy_checkout(destination: Path) -> None:
    """The files git would see in the checkout (tracked and untracked, not ignored), as they are on disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a deleted but still tracked file is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"--quick: expected {old!r} once in {path.name}; update bench_quickstart.py's quick edits")
    path.write_text(text.replace(old, new))


def make_quick(copy: Path) -> list[str]:
    """Shrink the copy's recipes; returns the fine-tune's extra arguments."""
    import yaml

    pretrain = copy / "configs" / "toy" / "pretrain.yaml"
    recipe = yaml.safe_load(pretrain.read_text())
    recipe["train"]["epochs"] = 1
    pretrain.write_text(yaml.safe_dump(recipe, sort_keys=False))
    replace_once(copy / "toy_pretrained" / "clip.py", "    epochs: int = 30\n", "    epochs: int = 3\n")
    return ["train.epochs=1", "train.validate=false"]  # scripts/train.sh makes each an --opt


def run_leg(name: str, root: Path, quick: bool, omp_one: bool, timeout: float) -> dict:
    copy = root / name
    copy.mkdir(parents=True)
    copy_checkout(copy)
    extra = make_quick(copy) if quick else []
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    if omp_one:
        env["OMP_NUM_THREADS"] = "1"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.monotonic()
    lines = []  # (seconds since start, line)
    with open(copy / "quickstart.log", "w") as log:
        process = subprocess.Popen(["bash", "scripts/train.sh", CONFIG, *extra], cwd=copy, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for line in process.stdout:
                lines.append((time.monotonic() - started, line.rstrip("\n")))
                log.write(line)
                if time.monotonic() - started > timeout:
                    raise TimeoutError
            process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"{name}: the quickstart failed (exit {process.returncode}); {copy}/quickstart.log:\n{tail}")
    return {"wall": wall, "load": load, "stages": stages(lines, wall), "log": copy / "quickstart.log",
            "threads": next((m.group(1) for _, text in lines if (m := THREADS.search(text))), "not logged")}


def stages(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    built = [(t, stage, float(match.group(1))) for t, text in lines for stage, pattern in BUILT
             if (match := pattern.search(text))]  # (when logged, stage, its seconds)
    found: dict[str, float] = {}
    for _, stage, seconds in built:
        found[stage] = found.get(stage, 0.0) + seconds
    pretrain_start = next((t for t, text in lines if PRETRAIN.search(text)), None)
    objectives = [t for t, text in lines if OBJECTIVE.search(text)]
    if pretrain_start is not None and len(objectives) >= 2:
        # A toy build that ran inside the pre-training run's start-up is its own stage, not pre-training.
        inside = sum(seconds for t, _, seconds in built if pretrain_start <= t <= objectives[-1])
        found["pre-train"] = objectives[-1] - pretrain_start - inside
    if objectives:
        found["fine-tune + test"] = wall - objectives[-1]
    found["other"] = wall - sum(found.values())
    return found


def start_load(count: int, limit: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY, str(limit)], stdin=subprocess.DEVNULL)
            for _ in range(count)]


def stop_load(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch of pre-training and fine-tuning, no validation, toy CLIP 3 epochs")
    parser.add_argument("--load", type=int, default=0, help="busy processes to run beside the legs (default 0)")
    parser.add_argument("--load-warmup", type=float, default=60.0, help="seconds between starting --load and leg 1")
    parser.add_argument("--load-limit", type=float, default=7200.0,
                        help="each busy process exits by itself after this many seconds")
    parser.add_argument("--repeats", type=int, default=1, help="runs per leg, alternating (median reported)")
    parser.add_argument("--timeout", type=float, default=5400.0, help="seconds allowed per leg")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies and their logs")
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not 0 <= args.load <= 4 * cpus:
        parser.error(f"--load must be between 0 and {4 * cpus} (4 per usable CPU)")

    print(describe_machine(), flush=True)
    print(f"quickstart: bash scripts/train.sh {CONFIG}{' (--quick)' if args.quick else ''}; synthetic load: "
          f"{args.load} busy process(es)", flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench_quickstart_"))
    load = start_load(args.load, args.load_limit)
    results: dict[str, list[dict]] = {"as written": [], "OMP_NUM_THREADS=1": []}
    try:
        if load:
            time.sleep(args.load_warmup)
        for repeat in range(args.repeats):
            legs = list(results) if repeat % 2 == 0 else list(results)[::-1]
            for leg in legs:
                result = run_leg(f"{'written' if leg == 'as written' else 'omp1'}_{repeat}", root, args.quick,
                                 leg != "as written", args.timeout)
                results[leg].append(result)
                detail = ", ".join(f"{k} {v:.0f} s" for k, v in result["stages"].items())
                print(f"{leg:>18}: {result['wall']:7.1f} s (load avg before {result['load']}; threads "
                      f"{result['threads']})\n{'':>20}{detail}", flush=True)
    finally:
        stop_load(load)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    written = statistics.median(r["wall"] for r in results["as written"])
    baseline = statistics.median(r["wall"] for r in results["OMP_NUM_THREADS=1"])
    ratio = written / baseline
    print(f"as written {written:.1f} s, OMP_NUM_THREADS=1 {baseline:.1f} s: ratio {ratio:.2f} "
          f"(target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}{'; --quick' if args.quick else ''})")
    if args.keep:
        print(f"copies and logs kept in {root}")


if __name__ == "__main__":
    main()
