#!/usr/bin/env bash
# Train and test every SMILE table row of one dataset, then write results/<dataset>.md, and beside it two plots:
# <dataset>_metrics.png (the table as bar charts, a panel per column) and <dataset>_lengths.png (the rows'
# caption-length histograms on test).
#
#   bash scripts/reproduce.sh coco|flickr30k|toy [KEY=VALUE | --opt KEY=VALUE ...]
#
# Each row is `bash scripts/train.sh configs/<dataset>/<row>.yaml` (train, validate every epoch, score the best
# checkpoint on test); the rows' <output_dir>/test_metrics.json become the table (scripts/make_table.py), printed
# next to the published numbers where the SMILE authors published some. Overrides apply to every row.
#
#   ROWS       rows to run, in order (default flickr30k: mle smile mle_smile random_subset reverse_subset
#              smile_no_first_token; coco: those, then the SCST rows scst_cider scst_clips scst_clips_cider
#              scst_clips_grammar scst_clips_from_smile scst_clips_smile and the prefix-LM rows prefix_mle
#              prefix_smile prefix_smile_from_mle prefix_transformer_mle prefix_transformer_smile; toy: mle smile
#              mle_smile, the SCST rows, prefix_mle prefix_smile prefix_smile_from_mle, and the VLM rows vlm_mle
#              vlm_smile vlm_smile_from_mle vlm_smile_lora). The table lists the rows of ROWS.
#   RUNS_DIR   put row R's output in RUNS_DIR/R (default: the config's output_dir)
#   SEEDS      seeds to repeat the SEED_ROWS over (default toy: 42 1 2; coco/flickr30k: none, each row runs once
#              with its config's seed). The first seed runs in the row's own output folder, each other seed S in
#              <output>_seed<S>; on the toy set every seed of a row that starts from the toy BLIP
#              (model.pretrained_recipe: configs/toy/pretrain.yaml) also pre-trains its own toy BLIP (a seed that
#              reused one pre-trained model would hide what pre-training varies), seed 42 in TOY_PRETRAIN and seed
#              S in TOY_PRETRAIN_seed<S>. A row that starts from another seed row's output (vlm_smile_from_mle
#              from vlm_mle) starts seed S from that row's seed S. The VLM rows' seeds share the one toy VLM
#              (cache/toy_vlm, its recipe's seed). The table shows those rows' mean over the seeds and a second
#              table their min-max range; the other rows are single-seed and say so.
#   SEED_ROWS  rows repeated over SEEDS (default toy: mle smile mle_smile; others: every row)
#   TOY_PRETRAIN  the toy pre-trained model's folder (default cache/toy_pretrain, the fine-tuning configs'
#              model.pretrained); another folder keeps a study apart, e.g. one run with OMP_NUM_THREADS=1
#   METRICS    eval.metrics for the test split (default coco/flickr30k: the paper's metrics,
#              coco,length,diversity,retrieval,clipscore,ppl, plus chair on coco, which need CLIP and GPT-2 weights (eval.clip_model,
#              eval.ppl_model); toy: the config's, every one of those plus toy_grounding, with the toy CLIP
#              and GPT-2 that the first toy row builds, offline, in cache/toy_clip and cache/toy_gpt2)
#   SKIP_DONE  1: keep a row whose test_metrics.json exists instead of training it again (default 0)
#   CHECK_DATA 0: skip the prepare_data.py --check-only pass over the images before the first row (default 1)
#   RESULTS    the markdown file to write (default results/<dataset>.md)
#   SECTION    a heading, e.g. "VLM rows": write the tables as the section "## <SECTION>" of RESULTS (replacing
#              that section, or appended; the rest of the file is kept) instead of the whole file, and the plots
#              as <RESULTS without .md>_<heading up to "(" or ",", as a slug>_{metrics,lengths}.png
#   LEX_DIV    the statistic of the table's Lex. Div. column: distinct_1 (default), distinct_2, vocab_size, ttr
#   NPROC, NNODES, ... as scripts/train.sh.
#
# A row whose output folder already holds a run is refused (train_caption.py never reuses one silently). After an
# interruption, `SKIP_DONE=1 bash scripts/reproduce.sh coco resume=auto` keeps the finished rows and continues the
# interrupted one from its latest checkpoint; `overwrite=true` trains every row again from the start.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHON

usage() { echo "usage: bash scripts/reproduce.sh coco|flickr30k|toy [KEY=VALUE ...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
DATASET=$1
shift
COMMAND_ARGS="$*"
# Self-critical rows start from the MLE (or SMILE) row's best checkpoint, so they come after those rows.
RL_ROWS="scst_cider scst_clips scst_clips_cider scst_clips_grammar scst_clips_from_smile scst_clips_smile"
PREFIX_ROWS="prefix_mle prefix_smile prefix_smile_from_mle"
VLM_ROWS="vlm_mle vlm_smile vlm_smile_from_mle vlm_smile_lora"
case "$DATASET" in
  coco)
    ALL_ROWS="mle smile mle_smile random_subset reverse_subset smile_no_first_token $RL_ROWS $PREFIX_ROWS prefix_transformer_mle prefix_transformer_smile"
    # + CHAIR: its columns appear when eval.instances (datasets/coco/annotations/instances_val2014.json) exists
    DEFAULT_METRICS="coco,length,diversity,retrieval,clipscore,ppl,chair" ;;
  flickr30k)
    ALL_ROWS="mle smile mle_smile random_subset reverse_subset smile_no_first_token"
    DEFAULT_METRICS="coco,length,diversity,retrieval,clipscore,ppl" ;;
  toy)
    ALL_ROWS="mle smile mle_smile $RL_ROWS $PREFIX_ROWS $VLM_ROWS"
    DEFAULT_METRICS="" ;;
  *) echo "reproduce.sh: unknown dataset '$DATASET'" >&2; usage ;;
esac
ROWS=${ROWS:-$ALL_ROWS}
if [[ "$DATASET" == toy ]]; then
  SEEDS=${SEEDS-42 1 2}
  SEED_ROWS=${SEED_ROWS:-mle smile mle_smile}
else
  SEEDS=${SEEDS:-}
  SEED_ROWS=${SEED_ROWS:-$ROWS}
fi
read -r -a SEED_LIST <<< "$SEEDS"
METRICS=${METRICS-$DEFAULT_METRICS}
RESULTS=${RESULTS:-results/$DATASET.md}

# Overrides as bare KEY=VALUE (scripts/train.sh turns them into --opt); the metric choice goes first so that an
# explicit eval.metrics=... on the command line still wins.
OVERRIDES=()
[[ -n "$METRICS" ]] && OVERRIDES+=("eval.metrics=[${METRICS//,/, }]")
while [[ $# -gt 0 ]]; do
  case "$1" in
    --opt) [[ $# -ge 2 ]] || { echo "reproduce.sh: --opt needs KEY=VALUE" >&2; exit 2; }; OVERRIDES+=("$2"); shift 2 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "reproduce.sh: expected KEY=VALUE overrides, got '$1'" >&2; exit 2 ;;
  esac
done

declare -A NAMES=(
  [mle]="MLE" [smile]="SMILE" [mle_smile]="MLE+SMILE 0.01:0.99" [random_subset]="Random subset"
  [reverse_subset]="Reverse subset" [smile_no_first_token]="SMILE w/o first-token MLE"
  [scst_cider]="SCST CIDEr-D" [scst_clips]="SCST CLIP-S" [scst_clips_cider]="SCST CLIP-S+CIDEr-D"
  [scst_clips_grammar]="SCST CLIP-S+grammar" [scst_clips_from_smile]="SCST CLIP-S from SMILE"
  [scst_clips_smile]="SCST CLIP-S + SMILE 0.1" [prefix_mle]="Prefix LM (ClipCap) MLE"
  [prefix_smile]="Prefix LM (ClipCap) SMILE" [prefix_smile_from_mle]="Prefix LM (ClipCap) MLE, then SMILE"
  [prefix_transformer_mle]="Prefix LM, transformer mapper, MLE"
  [prefix_transformer_smile]="Prefix LM, transformer mapper, SMILE"
  [vlm_mle]="Toy VLM (LLaVA) MLE" [vlm_smile]="Toy VLM (LLaVA) SMILE"
  [vlm_smile_from_mle]="Toy VLM (LLaVA) MLE, then SMILE" [vlm_smile_lora]="Toy VLM (LLaVA) SMILE, LoRA r 8"
)

# Resolve every row's config in one process before any training (this validates each config and override) and
# keep its output_dir; image_root and val_file (the same for every row) feed the data check below.
CONFIGS=()
for row in $ROWS; do
  [[ -n "${NAMES[$row]:-}" && -f "configs/$DATASET/$row.yaml" ]] || {
    echo "reproduce.sh: no row '$row' for $DATASET (rows: $ALL_ROWS)" >&2; exit 2; }
  CONFIGS+=("configs/$DATASET/$row.yaml")
done
resolved=$(CONFIGS="${CONFIGS[*]}" ROWS="$ROWS" "$PYTHON" - "${OVERRIDES[@]}" <<'EOF'
import os
import sys

import training

runs_dir = os.environ.get("RUNS_DIR")
for row, path in zip(os.environ["ROWS"].split(), os.environ["CONFIGS"].split()):
    config = training.load_config(path, sys.argv[1:])
    base = config["output_dir"]  # where another row's config looks for this row's checkpoints
    if runs_dir:
        config = training.load_config(path, sys.argv[1:] + [f"output_dir={runs_dir}/{row}"])
    model = config["model"]
    print(row, config["output_dir"], config["data"]["image_root"], config["data"]["val_file"],
          model.get("pretrained") or "-", model.get("pretrained_recipe") or "-", base, sep="\t")
EOF
)
declare -A OUTDIR PRETRAINED RECIPE BASE_OUTDIR
while IFS=$'\t' read -r row out root file pretrained recipe base; do
  OUTDIR[$row]=$out; IMAGE_ROOT=$root; VAL_FILE=$file; PRETRAINED[$row]=$pretrained; RECIPE[$row]=$recipe
  BASE_OUTDIR[$row]=$base
done <<< "$resolved"
declare -A ROW_OF
for row in $ROWS; do
  other=${ROW_OF[${OUTDIR[$row]}]:-}
  [[ -z "$other" ]] || {
    echo "reproduce.sh: rows $other and $row would both write to ${OUTDIR[$row]}; to move the runs, set" \
         "RUNS_DIR instead of overriding output_dir" >&2; exit 2; }
  ROW_OF[${OUTDIR[$row]}]=$row
done

# The images and annotation files, checked before any GPU time is spent (the layout prepare_data.py writes:
# <root>/annotations/<files>).
if [[ "$DATASET" != toy && "${CHECK_DATA:-1}" != 0 ]]; then
  annotations=$(dirname "$VAL_FILE")
  if [[ "$(basename "$annotations")" == annotations ]]; then
    "$PYTHON" scripts/prepare_data.py "$DATASET" --root "$(dirname "$annotations")" --image-root "$IMAGE_ROOT" \
      --check-only
  else
    echo "reproduce.sh: $VAL_FILE is not in an annotations/ folder; skipping the prepare_data.py check" >&2
  fi
fi

# The grammar reward's fine-tuned CLIP (scripts/train_grammar_clip.py), before the row that needs it.
if [[ " $ROWS " == *" scst_clips_grammar "* ]]; then
  grammar_dir=$("$PYTHON" -c 'import sys, training; print(training.load_config(sys.argv[1])["objective"]["scst"]["grammar_model"])' \
    "configs/$DATASET/scst_clips_grammar.yaml")
  if [[ ! -f "$grammar_dir/grammar_head.safetensors" ]]; then
    echo "== grammar CLIP: python scripts/train_grammar_clip.py --config configs/grammar_clip/$DATASET.yaml"
    "$PYTHON" scripts/train_grammar_clip.py --config "configs/grammar_clip/$DATASET.yaml"
  fi
fi

is_seed_row() { [[ ${#SEED_LIST[@]} -gt 0 && " $SEED_ROWS " == *" $1 "* ]]; }

# start_override ROW INDEX SEED: the model.pretrained=... that makes ROW's run of seed SEED (INDEX in SEED_LIST; -1
# for a row run once) start where it should, or nothing. A row that starts from the toy BLIP pre-training
# (model.pretrained_recipe: configs/toy/pretrain.yaml) starts a seed from that seed's own toy BLIP; a row that
# starts from another row's checkpoint (scst_* from mle, *_smile_from_mle from *_mle) starts from that row's run
# in this study (under RUNS_DIR), of the same seed when that row is a seed row.
start_override() {
  local row=$1 index=$2 seed=$3 other run
  if [[ "$DATASET" == toy && "${RECIPE[$row]}" == configs/toy/pretrain.yaml && $index -ge 0 ]]; then
    run=${TOY_PRETRAIN:-cache/toy_pretrain}
    [[ "$seed" != 42 ]] && run="${run}_seed$seed"
    echo "model.pretrained=$run/checkpoint_best.safetensors"
    return 0
  fi
  for other in $ROWS; do
    [[ "$other" != "$row" && "${PRETRAINED[$row]}" == "${BASE_OUTDIR[$other]}/"* ]] || continue
    run=${OUTDIR[$other]}
    is_seed_row "$other" && [[ $index -gt 0 ]] && run="${run}_seed$seed"
    if [[ "$run" != "${BASE_OUTDIR[$other]}" ]]; then
      echo "model.pretrained=$run/${PRETRAINED[$row]#"${BASE_OUTDIR[$other]}/"}"
    fi
    return 0  # (a nonzero status would end the script: set -e)
  done
  return 0
}

# run_row ROW OUT [KEY=VALUE ...]: train ROW into OUT (unless SKIP_DONE=1 finds it done); sets TAKEN.
run_row() {
  local row=$1 out=$2
  shift 2
  if [[ "${SKIP_DONE:-0}" == 1 && -f "$out/test_metrics.json" ]]; then
    echo "== $row: $out/test_metrics.json exists, skipped (SKIP_DONE=1)"
    TAKEN="-"
    return
  fi
  echo "== $row: bash scripts/train.sh configs/$DATASET/$row.yaml ${OVERRIDES[*]} $*"
  local start
  start=$(date +%s)
  bash scripts/train.sh "configs/$DATASET/$row.yaml" "${OVERRIDES[@]}" "$@"
  TAKEN=$(( $(date +%s) - start ))
  [[ -f "$out/test_metrics.json" ]] || {
    echo "reproduce.sh: $row finished without $out/test_metrics.json (is train.test_after_training off?)" >&2
    exit 1; }
}

declare -A SECONDS_TAKEN RUN_FILES
for row in $ROWS; do
  base_out=${OUTDIR[$row]}
  if ! is_seed_row "$row"; then
    extra=()
    [[ -n "${RUNS_DIR:-}" ]] && extra=("output_dir=$RUNS_DIR/$row")
    origin=$(start_override "$row" -1 "")
    [[ -n "$origin" ]] && extra+=("$origin")
    run_row "$row" "$base_out" "${extra[@]}"
    SECONDS_TAKEN[$row]=$TAKEN
    RUN_FILES[$row]="$base_out/test_metrics.json"
    continue
  fi
  taken=(); row_files=()
  for index in "${!SEED_LIST[@]}"; do
    seed=${SEED_LIST[$index]}
    out=$base_out
    [[ $index -gt 0 ]] && out="${base_out}_seed$seed"
    extra=("seed=$seed" "output_dir=$out")
    origin=$(start_override "$row" "$index" "$seed")
    [[ -n "$origin" ]] && extra+=("$origin")
    run_row "$row" "$out" "${extra[@]}"
    taken+=("$TAKEN"); row_files+=("$out/test_metrics.json")
  done
  SECONDS_TAKEN[$row]=$(IFS=/; echo "${taken[*]}")
  RUN_FILES[$row]=$(IFS=,; echo "${row_files[*]}")
done

files=(); names=()
for row in $ROWS; do
  files+=("${RUN_FILES[$row]}")
  if is_seed_row "$row"; then
    names+=("${NAMES[$row]}, mean of seeds $(IFS=,; echo "${SEED_LIST[*]}")")
  elif [[ ${#SEED_LIST[@]} -gt 0 ]]; then
    names+=("${NAMES[$row]} (one seed)")
  else
    names+=("${NAMES[$row]}")
  fi
done
table=$("$PYTHON" scripts/make_table.py "${files[@]}" --names "${names[@]}" --lex-div "${LEX_DIV:-distinct_1}")

mkdir -p "$(dirname "$RESULTS")"
{
  if [[ -n "${SECTION:-}" ]]; then
    echo "## $SECTION"
  else
    case "$DATASET" in
      coco) echo "# MSCOCO, Karpathy test split" ;;
      flickr30k) echo "# Flickr30K, Karpathy test split" ;;
      toy) echo "# Toy dataset, test split" ;;
    esac
  fi
  echo
  # The variables that change what runs or its numbers (the thread count changes float rounding).
  settings=""
  for name in ROWS SEEDS SEED_ROWS RUNS_DIR TOY_PRETRAIN METRICS NPROC OMP_NUM_THREADS SECTION; do
    if value=$(printenv "$name"); then settings+="$name=\"$value\" "; fi
  done
  echo "Written by \`${settings}bash scripts/reproduce.sh $DATASET${COMMAND_ARGS:+ $COMMAND_ARGS}\` on $(date -u '+%Y-%m-%d %H:%M UTC')," \
       "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')."
  echo "Each row: train with the row's config, keep the best epoch by validation CIDEr + BLEU-4, score it on test."
  if [[ ${#SEED_LIST[@]} -gt 0 ]]; then
    # Which starting point the seeds share: each its own toy BLIP, or one model (the toy VLM, a checkpoint).
    own=(); shared=()
    for row in $ROWS; do
      is_seed_row "$row" || continue
      if [[ "$DATASET" == toy && "${RECIPE[$row]}" == configs/toy/pretrain.yaml ]]; then own+=("$row"); else shared+=("$row"); fi
    done
    echo "Rows named \"mean of seeds\" ran once per seed ($SEEDS; SEEDS=...); the second table gives their min-max" \
         "range. Rows marked \"(one seed)\" ran once, with the config's seed."
    [[ ${#own[@]} -gt 0 ]] && echo "Each seed of ${own[*]} fine-tuned its own pre-trained toy BLIP."
    [[ ${#shared[@]} -gt 0 ]] && echo "The seeds of ${shared[*]} share their starting model (a row started from" \
         "another seed row starts each seed from that row's run of the same seed); the seed varies their fine-tuning."
  fi
  echo "BLEU-4 and CIDEr are x100; \"-\" marks a metric that was not computed. Test images scored per row:" \
       "$("$PYTHON" -c 'import json, sys; print(", ".join(str(json.load(open(f)).get("num_images", "?")) for f in ",".join(sys.argv[1:]).split(",")))' "${files[@]}")."
  echo
  echo "$table"
  echo
  echo "| Row | Config | Output | Wall time (s) |"
  echo "| --- | --- | --- | ---: |"
  for row in $ROWS; do
    output=${OUTDIR[$row]}
    is_seed_row "$row" && [[ ${#SEED_LIST[@]} -gt 1 ]] && output="$output, ${output}_seed{$(IFS=,; echo "${SEED_LIST[*]:1}")}"
    echo "| ${NAMES[$row]} | configs/$DATASET/$row.yaml | $output | ${SECONDS_TAKEN[$row]} |"
  done
  echo
  echo "Wall time: training, per-epoch validation and test, on $(getconf _NPROCESSORS_ONLN) CPU core(s) and" \
       "$("$PYTHON" -c 'import torch; n = torch.cuda.device_count(); print(f"{n} x {torch.cuda.get_device_name(0)}" if n else "no GPU")')" \
       "(NPROC=${NPROC:-all visible GPUs, or 1 without CUDA}); \"-\" means the row was reused (SKIP_DONE=1)."
  if [[ "$DATASET" == toy ]]; then
    echo "A seed's first toy row includes pre-training that seed's toy BLIP, and the first row also training the toy" \
         "CLIP and GPT-2, when cache/ held none; the first VLM row includes building the toy VLM (cache/toy_vlm)" \
         "when it was missing. A row's seeds' times are separated by /."
  fi
  if [[ "$DATASET" == coco ]]; then
    cat <<'EOF'

## Published (the SMILE authors' README: their released checkpoints on the COCO Karpathy test split)

The paper does not define which statistic its Lex. Div. is, so the Lex. Div. column above (the statistic named
in its header) is not necessarily the same quantity; each row's test_metrics.json holds every candidate
(`vocab_size`, `distinct_1`, `distinct_2`, `ttr`), and LEX_DIV=<name> picks the one the table shows.

| Checkpoint | Cap. Len. | Lex. Div. | R@1 | R@5 | CLIPScore | PPL |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| blip_smile_base.pth (SMILE) | 22.3 | 4.5 | 10.0 | 24.5 | 75.0 | 95.6 |
| blip_mle_smile_base.pth (MLE+SMILE 0.01:0.99) | 19.8 | 3.6 | 10.9 | 25.1 | 76.2 | 79.4 |
EOF
  fi
} > "$RESULTS.tmp"
if [[ -n "${SECTION:-}" ]]; then
  "$PYTHON" scripts/write_section.py "$RESULTS" "$RESULTS.tmp"
  rm -f "$RESULTS.tmp"
  echo "wrote the section \"## $SECTION\" of $RESULTS"
else
  mv "$RESULTS.tmp" "$RESULTS"
  echo "wrote $RESULTS"
fi
cat "$RESULTS"

# The plots come after the table, so one that fails (e.g. no matplotlib) costs nothing already written.
results_files=()
for row in $ROWS; do results_files+=("${OUTDIR[$row]}/test_results.json"); done  # a seed row: its first seed
PLOTS=${RESULTS%.md}
# A section's plots are named after its heading up to the first "(" or ",": "VLM rows (...)" -> <RESULTS>_vlm_rows_*.
[[ -n "${SECTION:-}" ]] && PLOTS="${PLOTS}_$(sed 's/[(,].*//' <<< "${SECTION,,}" | tr -cs 'a-z0-9' '_' | sed 's/^_*//; s/_*$//')"
case "$DATASET" in
  coco) title="MSCOCO Karpathy test split" ;; flickr30k) title="Flickr30K Karpathy test split" ;;
  toy) title="toy test split" ;;
esac
if ! "$PYTHON" scripts/make_table.py "${files[@]}" --names "${names[@]}" --lex-div "${LEX_DIV:-distinct_1}" \
     --results "${results_files[@]}" --title "$title" --plot "${PLOTS}_metrics.png" \
     --length-plot "${PLOTS}_lengths.png" > /dev/null; then
  echo "reproduce.sh: WARNING: the plots were not written (see the message above); $RESULTS is complete" >&2
fi
