"""`python -m pipeline.cli ...` (torchrun and the SLURM scripts start training this way)."""

from pipeline.cli import run

run()
