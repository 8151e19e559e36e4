"""The command table of `wmctl`: each command by name, in the order `wmctl --help` lists them, and the stage module
that owns it ("module:attribute", imported on first use by `pipeline.cli.lazy.LazyGroup`). The pipeline stage's
commands live in `pipeline/cli/`, the others' in their stage (`featurestore/cli.py`, `trainer/cli.py`,
`planner/cli.py`): `pipeline` imports no later stage. `bench` gathers commands of three stages under a table of its
own. The summaries are the commands' listing lines (tests/test_cli_layout.py holds them to the commands' help).
"""

from __future__ import annotations

from pipeline.cli.base import new_app
from pipeline.cli.lazy import Lazy, LazyGroup

BENCH_HELP = "Benchmarks (not tests): side-by-side ratios plus absolute numbers and the machine."

BENCH: dict[str, Lazy] = {
    "decode": Lazy("featurestore.cli:bench_decode_cmd",
                   "Sequential PyAV decode vs lerobot per-item access (pyav backend) on the same frames; frames per "
                   "CPU-second\nand the cores that feed one GPU."),
    "encode": Lazy("featurestore.cli:bench_encode_cmd",
                   "Decode-only, encoder-only, write-only and pipelined frames/s on the same frames; bytes per frame."),
    "rollout": Lazy("trainer.cli:bench_rollout_cmd",
                    "KV-cached vs uncached rollout of the same model and noise: time, speedup and their max "
                    "difference."),
    "plan": Lazy("planner.cli:bench_plan_cmd",
                 "Milliseconds per MPC step (one CEM optimisation) and model evaluations per step, per preset."),
    "train": Lazy("trainer.cli:bench_train_cmd",
                  "Step time, tokens/s, data-wait share (and MFU on a known GPU) of real training steps on a store."),
}


class BenchGroup(LazyGroup):
    table = BENCH


bench_app = new_app(BENCH_HELP, cls=BenchGroup)

COMMANDS: dict[str, Lazy] = {
    "ingest": Lazy("pipeline.cli.ingest:ingest",
                   "Validate every episode of a LeRobot v3.0 dataset and write a Parquet manifest."),
    "datasets": Lazy("pipeline.cli.ingest:datasets",
                     "List the registered datasets (one TOML file each; add yours to ./registry/)."),
    "encode": Lazy("featurestore.cli:encode",
                   "Encode every camera frame of a manifest with a frozen DINOv3 into the token store."),
    "status": Lazy("featurestore.cli:status",
                   "Per source: episodes committed / failed / pending, frames, bytes on disk, encoder identity."),
    "probe": Lazy("featurestore.cli:probe",
                  "Do the tokens see the scene? Kernel ridge regression (linear and RBF) from a frame's patch tokens "
                  "to the\nsimulator's state (pusht: agent and block x/y, block angle as sin/cos; Meta-World: "
                  "end-effector and object xyz),\nR^2 per target out of fold (5 folds of whole episodes). Needs a "
                  "source recorded in a simulator (`wmctl data`)."),
    "train": Lazy("trainer.cli:train",
                  "Train the shortcut-forcing dynamics (or a baseline: teacher-forced, deterministic) on a token "
                  "store."),
    "train-proposal": Lazy("trainer.cli:train_proposal_cmd",
                           "Train the run's amortized proposal: a small goal-conditioned policy head on the labelled "
                           "latents (current\nand goal frame -> the next `horizon` actions), saved in <run>/proposal/ "
                           "for `--planner cem+proposal|proposal`."),
    "eval": Lazy("trainer.cli:eval_",
                 "Latent prediction error at horizons vs copy-last and baselines; error vs K; a state probe."),
    "visualize": Lazy("trainer.cli:visualize",
                      "Ground truth | decoded true latents | decoded rollouts with and without actions, frame "
                      "numbered."),
    "data": Lazy("pipeline.cli.data:app", "Write the built-in LeRobot v3.0 datasets (with lerobot's own writer)."),
    "encoder": Lazy("featurestore.cli:encoder_app", "Encoder utilities."),
    "decoder": Lazy("trainer.cli:decoder_app", "The visualisation decoder (tokens -> pixels; for looking only)."),
    "plan": Lazy("planner.cli:app", "Goal-conditioned MPC in latent space (CEM or gradient)."),
    "bench": Lazy("pipeline.cli.table:bench_app", BENCH_HELP),
    "export": Lazy("trainer.cli_export:export",
                   "Export a trained world model as a self-contained folder (no paths of this machine in it), loadable "
                   "by every\ncommand that takes --run; optionally push it to the Hugging Face Hub."),
    "robot": Lazy("planner.cli_serve:app",
                  "Plan for a robot through LeRobot: the async-inference server, and LeRobot's own eval harness."),
}

# Lines that later stages add to `wmctl ingest`'s summary of the manifest it wrote: functions (manifest path -> one
# line) loaded by name like the commands, so the ingest command imports no later stage
MANIFEST_NOTES: tuple[str, ...] = ("featurestore.cli:capacity_summary",)
