#!/bin/bash
# Submit a wmctl job script with its log folder made first:
#
#   scripts/slurm/submit.sh --array=0-63%16 scripts/slurm/encode.sbatch 64 droid /scratch/$USER/tokens.zarr
#   scripts/slurm/submit.sh scripts/slurm/train.sbatch /scratch/$USER/runs/wm-base /scratch/$USER/tokens.zarr
#
# SLURM opens a job's `#SBATCH --output` file before the script runs and does not create its folder: a job whose
# slurm_logs/ is missing runs without a log. The scripts here write to slurm_logs/ in the folder they are
# submitted from (append mode: a requeued job adds to its earlier log), so this makes that folder, then passes
# every argument to sbatch unchanged. Plain `sbatch` works as well after `mkdir -p slurm_logs`.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: scripts/slurm/submit.sh [sbatch options] SCRIPT [script arguments]" >&2
  exit 2
fi
mkdir -p slurm_logs
exec "${SBATCH:-sbatch}" "$@"
