#!/usr/bin/env bash
# The toy self-critical (SCST) study of results/toy.md's section "Self-critical rows (SCST), seeds 42, 1, 2":
# trains its runs, then writes that section from the runs' files.
#
#   bash scripts/toy_scst_study.sh [--table-only] [KEY=VALUE ...]
#
# Per seed S in 42 1 2 (seed 42 in <RUNS>/<row>, seed S in <RUNS>/<row>_seed<S>), in this order:
#   mle             configs/toy/mle.yaml from that seed's own toy BLIP, <RUNS>/pretrain[_seedS], which the MLE run
#                   pre-trains first (configs/toy/pretrain.yaml, model.pretrained_recipe) when it is missing
#   scst_cider_nsc  configs/toy/scst_cider.yaml (the mean-of-others baseline) from that seed's MLE checkpoint_best
#   scst_cider      the same with the reference's greedy baseline (objective.scst.baseline=greedy)
#   scst_clips      configs/toy/scst_clips.yaml at its former lr, 1e-4 (train.lr=1.0e-4)
#   scst_clips_lr3e-4  configs/toy/scst_clips.yaml as it is (lr 3e-4)
#   scst_clips_lr1e-3  the same at lr 1e-3 (train.lr=1.0e-3)
# then the early-start rows, seed 42 only: early_pretrain (configs/toy/pretrain.yaml train.epochs=4), early_start
# (that model scored on val and test as is: scst_cider.yaml train.epochs=0) and scst_cider_early, scst_clips_early
# (greedy-baseline CIDEr-D and CLIP-S SCST from it, the latter at lr 1e-4 as measured).
# Every SCST run logs every step (train.log_every=1), which the per-epoch reward table reads.
#
# Then it replaces the section in results/toy.md (appends it when absent): the tables by scripts/make_table.py over
# the runs' test_metrics.json (mean and min-max over the seeds), the per-seed table from their log.jsonl and
# summary.json.
#
#   RUNS        the runs' folder (default runs/toy_scst)
#   TABLE_ONLY  1 (or --table-only): train nothing, regenerate the section from the runs in RUNS
#   SKIP_DONE   1 (default): keep a run whose test_metrics.json (early_pretrain: checkpoint_best.safetensors)
#               exists instead of training it again; 0: launch every run again, which (resume=auto) re-scores a
#               finished run on test; the overrides resume=false overwrite=true train it afresh
#   RESULTS     the markdown file whose section is written (default results/toy.md)
#   OMP_NUM_THREADS  1 unless set: the measured runs used one thread each; the toy MLE runs' numbers move with it
#
# KEY=VALUE overrides go to every training run, after its resume=auto (which they may override); with resume=auto
# an interrupted study continues where it stopped when run again. The study's commit is recorded once, in
# RUNS/study_commit.txt, when the first run starts, and the section quotes it. On the 2-core machine an MLE row
# with its pre-training took 14-18 minutes and an SCST run 2-7: about 2.5 hours for the whole study.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs/toy_scst}
RUNS=${RUNS%/}
TABLE_ONLY=${TABLE_ONLY:-0}
SKIP_DONE=${SKIP_DONE:-1}
RESULTS=${RESULTS:-results/toy.md}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHON RUNS RESULTS

OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --table-only) TABLE_ONLY=1 ;;
    *=*) OVERRIDES+=("$arg") ;;
    *) echo "toy_scst_study.sh: expected --table-only or KEY=VALUE overrides, got '$arg'" >&2; exit 2 ;;
  esac
done
[[ "$TABLE_ONLY" == 0 || "$TABLE_ONLY" == 1 ]] || { echo "toy_scst_study.sh: TABLE_ONLY is 0 or 1, got '$TABLE_ONLY'" >&2; exit 2; }
[[ "$SKIP_DONE" == 0 || "$SKIP_DONE" == 1 ]] || { echo "toy_scst_study.sh: SKIP_DONE is 0 or 1, got '$SKIP_DONE'" >&2; exit 2; }

SEEDS=(42 1 2)
# The greedy-baseline CIDEr-D rows: the reference's recipe, which scst_cider.yaml used before the mean of others.
GREEDY=(objective.scst.baseline=greedy objective.scst.log_greedy=false)
# The CLIP-S rows at scst_clips.yaml's former lr (scst_base.yaml's 1e-4), before it took 3e-4.
CLIPS_MEASURED=(train.lr=1.0e-4)

# train DONE_FILE CONFIG KEY=VALUE...: one training run, skipped when SKIP_DONE=1 finds DONE_FILE.
train() {
  local done_file=$1 config=$2
  shift 2
  if [[ "$SKIP_DONE" == 1 && -f "$done_file" ]]; then
    echo "== $done_file exists, skipped (SKIP_DONE=1)"
    return
  fi
  if [[ ! -f "$RUNS/study_commit.txt" ]]; then
    mkdir -p "$RUNS"
    echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')" \
      > "$RUNS/study_commit.txt"
  fi
  echo "== $(date -u '+%F %T') bash scripts/train.sh $config $* resume=auto ${OVERRIDES[*]}"
  bash scripts/train.sh "$config" "$@" resume=auto "${OVERRIDES[@]}"
  [[ -f "$done_file" ]] || { echo "toy_scst_study.sh: the run left no $done_file" >&2; exit 1; }
}

if [[ "$TABLE_ONLY" == 0 ]]; then
  for seed in "${SEEDS[@]}"; do
    sfx=""
    [[ $seed != 42 ]] && sfx="_seed$seed"
    start=$RUNS/mle$sfx/checkpoint_best.safetensors
    train "$RUNS/mle$sfx/test_metrics.json" configs/toy/mle.yaml seed="$seed" output_dir="$RUNS/mle$sfx" \
      model.pretrained="$RUNS/pretrain$sfx/checkpoint_best.safetensors"
    scst=(seed="$seed" model.pretrained="$start" train.log_every=1)
    train "$RUNS/scst_cider_nsc$sfx/test_metrics.json" configs/toy/scst_cider.yaml "${scst[@]}" \
      output_dir="$RUNS/scst_cider_nsc$sfx"
    train "$RUNS/scst_cider$sfx/test_metrics.json" configs/toy/scst_cider.yaml "${scst[@]}" "${GREEDY[@]}" \
      output_dir="$RUNS/scst_cider$sfx"
    train "$RUNS/scst_clips$sfx/test_metrics.json" configs/toy/scst_clips.yaml "${scst[@]}" "${CLIPS_MEASURED[@]}" \
      output_dir="$RUNS/scst_clips$sfx"
    train "$RUNS/scst_clips_lr3e-4$sfx/test_metrics.json" configs/toy/scst_clips.yaml "${scst[@]}" \
      output_dir="$RUNS/scst_clips_lr3e-4$sfx"
    train "$RUNS/scst_clips_lr1e-3$sfx/test_metrics.json" configs/toy/scst_clips.yaml "${scst[@]}" train.lr=1.0e-3 \
      output_dir="$RUNS/scst_clips_lr1e-3$sfx"
  done
  early=$RUNS/early_pretrain/checkpoint_best.safetensors
  train "$early" configs/toy/pretrain.yaml seed=42 output_dir="$RUNS/early_pretrain" train.epochs=4
  train "$RUNS/early_start/test_metrics.json" configs/toy/scst_cider.yaml seed=42 model.pretrained="$early" \
    "${GREEDY[@]}" train.epochs=0 output_dir="$RUNS/early_start"
  train "$RUNS/scst_cider_early/test_metrics.json" configs/toy/scst_cider.yaml seed=42 model.pretrained="$early" \
    "${GREEDY[@]}" train.log_every=1 output_dir="$RUNS/scst_cider_early"
  train "$RUNS/scst_clips_early/test_metrics.json" configs/toy/scst_clips.yaml seed=42 model.pretrained="$early" \
    "${CLIPS_MEASURED[@]}" train.log_every=1 output_dir="$RUNS/scst_clips_early"
fi

# ---- the section of results/toy.md ----
# R as the section prints it: relative to the repository when RUNS lies inside it, else as given.
R=$("$PYTHON" -c 'import os, sys; p = os.path.abspath(sys.argv[1]); r = os.path.relpath(p)
print(p if r.startswith("..") else r)' "$RUNS")
COMMIT=$(cat "$RUNS/study_commit.txt" 2>/dev/null || echo "an unrecorded commit")
# The summary table's rows: RUN|NAME, RUN one folder (one seed) or, with "seeds:", <RUN>, <RUN>_seed1 and _seed2.
TABLE_ROWS=(
  "seeds:mle|MLE start, mean of seeds 42,1,2"
  "seeds:scst_cider_nsc|SCST CIDEr-D (scst_cider.yaml: mean-of-others baseline), mean of seeds 42,1,2"
  "seeds:scst_cider|SCST CIDEr-D, greedy baseline (the reference's), mean of seeds 42,1,2"
  "seeds:scst_clips|SCST CLIP-S, lr 1e-4 (scst_clips.yaml before), mean of seeds 42,1,2"
  "seeds:scst_clips_lr3e-4|SCST CLIP-S, lr 3e-4 (scst_clips.yaml), mean of seeds 42,1,2"
  "seeds:scst_clips_lr1e-3|SCST CLIP-S, lr 1e-3, mean of seeds 42,1,2"
  "early_start|Early MLE start (4 pre-training epochs, seed 42)"
  "scst_cider_early|SCST CIDEr-D (greedy baseline) from the early start"
  "scst_clips_early|SCST CLIP-S (lr 1e-4) from the early start"
)
files=(); names=(); missing=()
for entry in "${TABLE_ROWS[@]}"; do
  run=${entry%%|*}; name=${entry#*|}
  if [[ $run == seeds:* ]]; then
    run=${run#seeds:}
    list="$RUNS/$run/test_metrics.json,$RUNS/${run}_seed1/test_metrics.json,$RUNS/${run}_seed2/test_metrics.json"
  else
    list="$RUNS/$run/test_metrics.json"
  fi
  complete=1
  IFS=, read -r -a parts <<< "$list"
  for part in "${parts[@]}"; do [[ -f "$part" ]] || complete=0; done
  if [[ $complete == 1 ]]; then files+=("$list"); names+=("$name"); else missing+=("$name"); fi
done
[[ ${#files[@]} -gt 0 ]] || { echo "toy_scst_study.sh: no finished run in $RUNS" >&2; exit 1; }
section=$(mktemp)
trap 'rm -f "$section"' EXIT
{
  echo "## Self-critical rows (SCST), seeds 42, 1, 2"
  echo
  echo "\`bash scripts/toy_scst_study.sh\` trains these runs into \`\${RUNS:-runs/toy_scst}\` (one thread each, OMP_NUM_THREADS=1) and writes this section; \`RUNS=DIR TABLE_ONLY=1 bash scripts/toy_scst_study.sh\` writes it again from the runs in DIR."
  echo "The numbers below are from the runs in $R, on the 2-core machine, at $COMMIT."
  echo "Each seed S: \`configs/toy/mle.yaml\` from that seed's own pre-trained toy BLIP (\`seed=S output_dir=$R/mle[_seedS] model.pretrained=$R/pretrain[_seedS]/checkpoint_best.safetensors\`),"
  echo "then \`configs/toy/scst_cider.yaml\` (output $R/scst_cider_nsc[_seedS]) and \`configs/toy/scst_clips.yaml\` from that MLE row's best checkpoint (\`seed=S model.pretrained=$R/mle[_seedS]/checkpoint_best.safetensors train.log_every=1\`);"
  echo "these MLE runs are not the MLE row above (2 threads)."
  echo "The greedy-baseline CIDEr-D rows (\`objective.scst.baseline=greedy objective.scst.log_greedy=false\`, output $R/scst_cider[_seedS]) are the reference's recipe, which scst_cider.yaml used before; the early-start rows use it too."
  echo "The CLIP-S rows differ only in the learning rate: 1e-4 (\`train.lr=1.0e-4\`, $R/scst_clips[_seedS]; scst_clips.yaml before), 3e-4 (scst_clips.yaml as it is, $R/scst_clips_lr3e-4[_seedS]) and 1e-3 (\`train.lr=1.0e-3\`, $R/scst_clips_lr1e-3[_seedS])."
  echo "SCST keeps the best val epoch by the reward's metric (\`eval.select_by\`: CIDEr, CLIPScore), the MLE start (epoch -1) included (\`eval.keep_start\`)."
  echo "The early-start rows (one seed) fine-tune a toy BLIP pre-trained for 4 epochs instead of 12 (\`configs/toy/pretrain.yaml train.epochs=4\`), scored on test as is (\`configs/toy/scst_cider.yaml train.epochs=0\`: the start scored on val, kept, and scored on test)."
  echo "Tables: \`python scripts/make_table.py\` over the runs' test_metrics.json; the per-seed table from their log.jsonl and summary.json."
  for name in "${missing[@]}"; do echo "Not run yet, so not in the tables: $name."; done
  echo
  "$PYTHON" scripts/make_table.py "${files[@]}" --names "${names[@]}"
  echo
  "$PYTHON" - "$RUNS" <<'PY'
import json
import sys
from pathlib import Path

R = Path(sys.argv[1])


def log(run):
    with open(R / run / "log.jsonl") as lines:
        return [json.loads(line) for line in lines]


def test(run):
    return json.loads((R / run / "test_metrics.json").read_text())


# Words that a fluent toy caption may repeat ("a red star on a white background").
FUNCTION_WORDS = {"a", "an", "on", "the", "to", "in", "of", "at"}


def repeating(run):
    """How many of the run's test captions say a content word twice ("a white star white star ...")."""
    captions = [r["caption"].split() for r in json.loads((R / run / "test_results.json").read_text())]
    words = [[w for w in c if w not in FUNCTION_WORDS] for c in captions]
    return sum(len(w) != len(set(w)) for w in words), len(captions)


def epochs(records, key):
    """The per-epoch mean of a logged training statistic, epochs joined by ' / '."""
    by = {}
    for r in records:
        if r["kind"] == "train" and key in r:
            by.setdefault(r["epoch"], []).append(r[key])
    return " / ".join(f"{sum(v) / len(v):.3f}" for _, v in sorted(by.items()))


print("Per seed: the start's and the SCST row's test score (CIDEr x100, CLIPScore), the val epoch kept (-1: the start), and the")
print("greedy and sample training rewards, each the mean over an epoch's 28 steps (all 1,800 training images), epochs 0 / 1 / 2;")
print("colour + shape right on test (start -> SCST) and the test captions that say a content word twice:")
print()
print("| Row | Seed | Start test | SCST test | Gain | Kept epoch | Greedy reward per epoch | Sample reward per epoch | Samples = greedy, per epoch | Colour+shape right | Repeated word |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: |")
rows = [("SCST CIDEr-D (mean of others)", "scst_cider_nsc", "CIDEr", 100.0),
        ("SCST CIDEr-D, greedy baseline", "scst_cider", "CIDEr", 100.0),
        ("SCST CLIP-S, lr 1e-4", "scst_clips", "CLIPScore", 1.0),
        ("SCST CLIP-S, lr 3e-4", "scst_clips_lr3e-4", "CLIPScore", 1.0),
        ("SCST CLIP-S, lr 1e-3", "scst_clips_lr1e-3", "CLIPScore", 1.0)]
early_rows = ("scst_cider", "scst_clips")  # the rows also run from the early start
for name, row, key, scale in rows:
    for seed, suffix in (("42", ""), ("1", "_seed1"), ("2", "_seed2"), ("42, early start", "_early")):
        run = row + suffix
        if suffix == "_early" and row not in early_rows:
            continue
        if not (R / run / "test_metrics.json").exists():
            print(f"| {name} | {seed} | not run | | | | | | | | |")
            continue
        start = test("early_start") if suffix == "_early" else test("mle" + suffix)
        end = test(run)
        summary = json.loads((R / run / "summary.json").read_text())
        records = log(run)
        grounding = f"{start['ground_colour_shape']:.0f} -> {end['ground_colour_shape']:.0f} %"
        repeated, total = repeating(run)
        print(f"| {name} | {seed} | {scale * start[key]:.1f} | {scale * end[key]:.1f} | {scale * (end[key] - start[key]):+.1f} | "
              f"{summary['best_epoch']} | {epochs(records, 'greedy_reward') or '-'} | {epochs(records, 'reward')} | "
              f"{epochs(records, 'sample_is_greedy') or '-'} | {grounding} | {repeated}/{total} |")
PY
} > "$section"

# Replace the section if RESULTS has one (up to the next "## " heading), else append it.
"$PYTHON" scripts/write_section.py "$RESULTS" "$section"
echo "wrote the SCST section of $RESULTS from the runs in $R"
