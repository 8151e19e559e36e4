#!/usr/bin/env bash
# `make demo`: the whole pipeline end to end on the built-in pusht data, on CPU.
set -euo pipefail
DEMO=${1:-demo}
WMCTL=${WMCTL:-.venv/bin/wmctl}
export SVT_LOG=${SVT_LOG:-1}
mkdir -p "$DEMO"

echo "== 1/2 data: built-in LeRobot v3.0 datasets (lerobot's writer)"
$WMCTL data pusht --out "$DEMO/data/pusht-demo" --episodes 40 --seed 0
echo "== 2/2 ingest"
$WMCTL ingest --root "$DEMO/data/pusht-demo" --out "$DEMO/manifests/pusht-demo.parquet"
