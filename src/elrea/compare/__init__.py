"""`elrea compare`: does ELREA help on my data, against one LoRA given the same compute?

One resumable command fits, on the user's own train / validation / test files:

    lora             one LoRA adapter at the config's epochs (ELREA's base adapter)
    lora-matched     one LoRA trained as many optimizer steps as ELREA's base + all experts
    elrea-<router>   ELREA with each router (gradient, embedding, learned), full ensemble at
                     the temperature chosen on validation, -top1 (one adapter per prompt) and
                     -top2 (sparse: the two best experts, at the full ensemble's best temperature)
    uniform          the chosen run's experts with equal weights
    random           experts on random clusters of the chosen run's sizes (gradient router)
    source           experts on clusters by the records' `source` (when every record has one)
    arrow            a peer method: PEFT's Arrow routing (per token and layer, top-3) over
                     the chosen run's experts
    elrea-half       the chosen ELREA setting refitted at half its epochs (the budget curve)

Settings that are chosen (candidate fits such as features.center, router, temperature, top-k)
are chosen on validation, never on test; without a validation file one is carved from the
training data, and said so. Every fit shares the base adapter (and features) it can with
ELREA's first run; every decoded split is cached under OUT/evals, so re-running resumes.
Every further --test file (e.g. bigbench-mix's held-out bbh.jsonl) is decoded by the same
methods and gets its own table and paired intervals. Output: tables on the terminal,
OUT/compare.json, OUT/report.md with pictures; and first, as soon as the chosen ELREA and the
compute-matched LoRA exist, OUT/headline.json (those two and lora on every test file).
"""

from .runner import CompareOptions, compare

__all__ = ["CompareOptions", "compare"]
