"""The demo (`elrea demo`, run by `make demo`): fit ELREA on the embedded default model and
the built-in reasoning mixture, evaluate it against the base adapter, and write a report.

    export reasoning-mix slice -> fit -> eval on held-out test -> runs/demo/report.md

Two sizes: the default is small enough that a newcomer sees it finish (`make demo`); `--full`
(`make demo FULL=1`) trains on twice the examples and tests on twice as many.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from .config import load_config
from .rundir import Run, write_json

log = logging.getLogger(__name__)


def demo_config_path() -> Path:
    return Path(str(resources.files("elrea") / "configs" / "demo.yaml"))


# (training examples, test examples) of each size
SIZES = {"quick": (160, 64), "full": (320, 128)}


def run_demo(out: str | Path, train: int | None = None, test: int | None = None, seed: int = 0,
             overrides: list[str] | None = None, size: str = "quick") -> dict:
    """Returns the evaluation result; writes data/, the run, eval.json and report.md under `out`.
    train/test default to the size's (SIZES)."""
    train = SIZES[size][0] if train is None else train
    test = SIZES[size][1] if test is None else test
    from .api import ELREA
    from .card import write_model_card
    from .data import load_records
    from .evaluation import evaluate
    from .pipeline import fit
    from .report import write_report
    from .tasks import checker, export_mixture

    out = Path(out)
    t0 = time.time()
    paths = export_mixture("reasoning-mix", out / "data", train=train, validation=max(8, test // 4),
                           test=test, seed=seed)
    cfg = load_config(demo_config_path(), overrides or [])
    fit(paths["train"], out, cfg)
    t_fit = time.time() - t0
    model = ELREA.from_pretrained(out)
    test_records = load_records(paths["test"])
    result = evaluate(model, test_records, checker=checker("reasoning-mix"))
    write_json(Run(out).eval, result)
    write_model_card(out)  # with the evaluation table
    sources = [r.source for r in load_records(paths["train"])]
    extra = (f"Backbone `{cfg.model.name}`, {train} training examples of the built-in reasoning-mix "
             f"({len(set(sources))} sources), {len(test_records)} held-out test examples. "
             f"Fit {t_fit / 60:.1f} min, total {(time.time() - t0) / 60:.1f} min on this machine. "
             f"Config: `{demo_config_path().name}` (shipped in the package).")
    write_report(out, result, model.adapters, sources, title="elrea demo", extra=extra)
    log.info("report: %s", Run(out).report)
    return result
