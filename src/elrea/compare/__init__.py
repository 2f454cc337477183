"""`elrea compare`: does ELREA help on my data, against one LoRA given the same compute?

One resumable command fits, on the user's own train / validation / test files:

    lora             one LoRA adapter at the config's epochs (ELREA's base adapter)
    lora-matched     one LoRA trained as many optimizer steps as ELREA's base + all experts
    elrea-<router>   ELREA with each router (gradient, embedding, learned), full ensemble at
                     the temperature chosen on validation, and -top1 (one adapter per prompt)
    uniform          the chosen run's experts with equal weights
    random           experts on random clusters of the chosen run's sizes (gradient router)
    source           experts on clusters by the records' `source` (when every record has one)

Settings that are chosen (candidate fits such as features.center, router, temperature, top-1)
are chosen on validation, never on test; without a validation file one is carved from the
training data, and said so. Every fit shares the base adapter (and features) it can with
ELREA's first run; every decoded split is cached under OUT/evals, so re-running resumes.
Output: tables on the terminal, OUT/compare.json, OUT/report.md with pictures.
"""

from .runner import CompareOptions, compare

__all__ = ["CompareOptions", "compare"]
