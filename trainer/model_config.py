"""The architecture's config (`ModelConfig`): which model, how wide and deep, how actions enter. Frozen, keyword-only,
validated here; `trainer.config.TrainConfig.model` holds one."""

from __future__ import annotations

import dataclasses

from pipeline.stage import UserError

# shortcut: the shortcut-forcing dynamics; teacher_forced: the DINO-WM-style baseline; deterministic: the control,
# the shortcut model's transformer trained with plain next-frame x-prediction (clean context, no noise)
MODEL_KINDS = ("shortcut", "teacher_forced", "deterministic")
CONDITIONINGS = ("token", "concat", "add")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture. `kind`: the shortcut-forcing dynamics, the DINO-WM-style teacher-forced baseline, or the
    deterministic control (the shortcut backbone trained without noise)."""

    kind: str = "shortcut"
    dim: int = 128
    depth: int = 4
    heads: int = 4
    kv_heads: int = 2
    mlp_ratio: float = 4.0
    registers: int = 4
    time_every: int = 4  # causal time attention in every N-th layer (always in the last one)
    softcap: float | None = 50.0  # attention logit soft-capping; None uses SDPA's fused kernels
    qk_norm: bool = True
    # z1_hat = c_skip(tau) z_tau + c_out(tau) F(c_in(tau) z_tau): EDM-style preconditioning, still x-prediction
    precondition: bool = True
    temporal_prior: bool = True  # precondition around the previous frame's estimate (static tokens copy for free)
    # c_skip: the output carries the least-squares estimate from the noisy input (EDM); False: the network predicts
    # the whole change from the prior (z1_hat = mu + c_out F), so no input noise reaches a sample unless learned
    precondition_skip: bool = True
    merge_2x2: bool = False  # merge 2x2 neighbouring patch tokens into one (4x fewer tokens)
    rope_theta_space: float = 100.0
    rope_theta_time: float = 10_000.0
    k_max: int = 64  # finest shortcut step is 1/k_max
    max_frames: int = 256  # teacher-forced baseline: learned frame embeddings
    # how actions enter. Teacher-forced baseline: actions (and proprio) as one more token per frame, or (DINO-WM)
    # embedded to `concat_dim` channels each and concatenated to every patch token. Shortcut / deterministic:
    # the action token, and with "add" its embedding also added to every latent token of its frame (each token
    # sees the frame's action from the first layer, not only through space attention)
    conditioning: str = "token"
    concat_dim: int = 10

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise UserError(f"model kind {self.kind!r}: choose one of {MODEL_KINDS}")
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise UserError(f"model dim {self.dim} must divide by heads {self.heads}, "
                            f"heads by kv_heads {self.kv_heads}")
        if (self.dim // self.heads) % 4:
            raise UserError(f"head dim {self.dim // self.heads} must be a multiple of 4 (2-D RoPE)")
        if self.k_max < 1 or self.k_max & (self.k_max - 1):
            raise UserError(f"k_max {self.k_max} must be a power of two")
        if self.time_every < 1:
            raise UserError("time_every must be >= 1")
        if self.conditioning not in CONDITIONINGS:
            raise UserError(f"model conditioning {self.conditioning!r}: choose one of {CONDITIONINGS}")
        if self.conditioning == "concat" and self.kind != "teacher_forced":
            raise UserError("model.conditioning=concat (DINO-WM) is for --model teacher-forced")
        if self.conditioning == "add" and self.kind == "teacher_forced":
            raise UserError("model.conditioning=add is for the shortcut and deterministic models (the teacher-forced "
                            "baseline takes token or concat)")
        if self.conditioning == "concat" and not 0 < 2 * self.concat_dim < self.dim:
            raise UserError(f"concat_dim {self.concat_dim}: action and proprio channels must leave room in dim "
                            f"{self.dim}")
