"""What a training run derives from its config and its store when it starts, in one step (`derive`): the frameskip
of each source at the model's `fps` and how a model frame's actions add up (`trainer.sources.derive_rate`), and a
weight for every training source (`trainer.sources.derive_mix`). They come back as `Derived`, not written into the
config the command built; `Derived.recorded(cfg)` is the config the run records (config.json, checkpoints: the
fields it always recorded, resolved) and trains with, so eval and planning read them back. The camera slots and
embodiments are derived with the token shape (`trainer.sources.token_shape`), recorded in the checkpoint."""

from __future__ import annotations

import dataclasses

from featurestore.reader import TokenReader
from trainer.config import TrainConfig
from trainer.sources import derive_mix, derive_rate


@dataclasses.dataclass(frozen=True)
class Derived:
    frameskip: int  # the labelled sources' (the action space's), or the first source's
    source_frameskip: tuple[tuple[str, int], ...]  # (source, frameskip) when the sources' differ, else ()
    action_kinds: tuple[str, ...]  # per action dimension, how a model frame's steps add up (() at frameskip 1)
    mix_weights: tuple[tuple[str, float], ...]  # (source, weight) of every training source (as given under
    #                                             `labelled_fraction`, which decides the mix instead)

    def rated(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` at the derived rate, its mix as the command gave it (what a resumed run's config is checked by)."""
        return dataclasses.replace(cfg, frameskip=self.frameskip, source_frameskip=self.source_frameskip,
                                   action_kinds=self.action_kinds)

    def recorded(self, cfg: TrainConfig) -> TrainConfig:
        """The config the run trains with and records: `cfg` with everything derived filled in."""
        return dataclasses.replace(self.rated(cfg), mix_weights=self.mix_weights)


def derive(cfg: TrainConfig, reader: TokenReader, *, saved_mix: tuple[tuple[str, float], ...] = ()) -> Derived:
    """Everything a run derives from `cfg` and the store of `reader` (pinned to a resumed run's episodes first),
    refused with the fix where the store cannot serve it. `saved_mix`: a resumed run's recorded weights, which it
    keeps unless the command gives its own."""
    frameskip, per_source, kinds = derive_rate(cfg, reader)
    rate = Derived(frameskip, per_source, kinds, mix_weights=())
    mix = derive_mix(dataclasses.replace(rate.rated(cfg), mix_weights=cfg.mix_weights or tuple(saved_mix)), reader)
    return dataclasses.replace(rate, mix_weights=mix)
