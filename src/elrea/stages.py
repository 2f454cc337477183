"""The stages of `elrea fit`, each declared once (docs/method.md, "Pipeline").

A `Stage` says everything the rest of the package needs to know about it: its place in the
order, the stage whose fingerprint its own chains from (`after`), the config sections (and the
single fields of other sections) that enter its fingerprint, whether only the main process runs
it, whether inference needs its output, and the function that runs it (a lazy "module:function"
target, so that importing this table imports nothing heavy). The order, the fingerprint chain
(elrea.pipeline.fingerprints), `elrea fit --from/--until`, what `ELREA.from_pretrained` checks
(elrea.rundir.check_readable), which sections a field belongs to (RunConfig.section_hash) and
which folder a stage writes (`Run.stage_dir`: the folder named after it) all follow from this
table. Adding a stage is one declaration here and its function.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    run: str                          # "module:function", called with the fit's context
    after: str | None = None          # whose fingerprint this stage's chains from (None: the data's)
    sections: tuple[str, ...] = ()    # config sections in its fingerprint
    fields: tuple[str, ...] = ()      # fields of other sections that are this stage's inputs
    settings: str | None = None       # "module:function" (cfg -> str) used instead of `sections`
    main_only: bool = False           # the main process alone runs it; the others wait
    inference: bool = False           # ELREA.from_pretrained loads its output
    hashed: bool = False              # its files' SHA-256 are recorded, checked on load and on re-runs

    def function(self):
        return _load(self.run)

    def settings_hash(self, cfg) -> str:
        return _load(self.settings)(cfg) if self.settings else cfg.section_hash(*self.sections, stage=self.name)


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: tuple[Stage, ...] = (
    Stage("base", "elrea.pipeline:stage_base", sections=("seed", "model", "data", "lora", "base"),
          inference=True, hashed=True),
    Stage("features", "elrea.pipeline:stage_features", after="base", sections=("features",),
          fields=("clustering.signal",)),
    Stage("clusters", "elrea.pipeline:stage_clusters", after="features", sections=("clustering",),
          fields=("features.center",), main_only=True, inference=True, hashed=True),
    Stage("experts", "elrea.pipeline:stage_experts", after="clusters", sections=("experts",), inference=True,
          hashed=True),
    Stage("router", "elrea.pipeline:stage_router", after="clusters", settings="elrea.pipeline:router_settings",
          main_only=True, hashed=True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
INFERENCE_STAGES = tuple(s.name for s in STAGES if s.inference)   # what ELREA.from_pretrained needs
# {dotted field: the stage whose fingerprint holds it}, for fields outside that stage's sections
STAGE_OF_FIELD = {f: s.name for s in STAGES for f in s.fields}


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage {name!r}; valid: {', '.join(STAGE_NAMES)}")
