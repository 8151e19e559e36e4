# Shared by demo.sh and demo-arm.sh (sourced): stage banners and the idempotent train step.
# Needs DEMO, WMCTL, STEPS and t0 set by the caller.
stage() { echo; echo "== $1  (+$((SECONDS - t0)) s)"; }

# the DINO-WM baseline's structure (depth 6, 3 history frames, action/proprio concatenated to every patch, no
# merge) at the demos' width 128 (its 512-wide, 19.8M-parameter default is too slow a step on 2 cores: its time in
# docs/results.md, 2026-11-30, "CPU kernel timings and run times recorded in code comments")
DINOWM_AT_DEMO_WIDTH=(--preset dinowm --set model.dim=128 --set model.heads=4 --set model.kv_heads=4
                      --set batch_size=16 --set warmup_steps=50 --set ema_decay=0.99 --set num_workers=1)

train() {  # name, then the flags: a new run, or the existing one resumed to $STEPS
  local name=$1; shift
  if [ -f "$DEMO/runs/$name/config.json" ]; then
    $WMCTL train --out "$DEMO/runs/$name" --resume --steps "$STEPS"
  else
    $WMCTL train --store "$DEMO/tokens.zarr" --steps "$STEPS" --out "$DEMO/runs/$name" "$@"
  fi
}
