"""Damage: every file of a fitted run corrupted in several ways, and what elrea does with it.

    python benchmarks/damage.py            # a tiny run built here (about 3 minutes on 2 CPU cores)
    python benchmarks/damage.py --quick    # four files only

For each file of the run's inference stages (base, clusters, experts, router) and each damage
that applies to it (truncate it to half, write random bytes over its last 64, replace a JSON file
by JSON of another shape, set a safetensors file's tensors to NaN with its record rewritten, as a
diverged training would leave it, delete it), the run is loaded and routed and decodes a few prompts
(`ELREA.from_pretrained`, `route` with every router, `generate`), and then repaired with the
`elrea fit` that made it. Each case is counted as:

    clear error     loading or routing raised elrea's own one-line error (no traceback)
    silent wrong    everything ran, and some output differs from the undamaged run's (target 0)
    unaffected      everything ran with the undamaged run's outputs (the damage did not matter)
    traceback       any other exception (target 0)

and the repair as `rebuilt` (after `fit`, the run loads and every output equals the undamaged
run's) or `not rebuilt`. The table and benchmarks/results/damage.json hold the counts and every
case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, print_table, tiny_model_dir  # noqa: E402

PROMPTS = ["Add 3 and 4.", "Reverse the word abc.", "Uppercase the word dog.", "Subtract 2 from 9."]


def build(tmp: Path) -> tuple[Path, Path, list[str]]:
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.testing import make_toy_records, write_jsonl

    data = write_jsonl(tmp / "train.jsonl", make_toy_records(64, seed=0))
    overrides = [f"model.name={tiny_model_dir()}", "base.epochs=2", "experts.epochs=1", "base.lr=2e-3",
                 "experts.lr=2e-3", "features.dim=512", "clustering.min_cluster_size=4", "clustering.num_clusters=3",
                 "base.micro_batch_size=8", "experts.micro_batch_size=8", "generation.max_new_tokens=4",
                 "model.device=cpu"]
    fit(data, tmp / "ref", load_config(None, overrides))
    return tmp / "ref", data, overrides


def outputs(run: Path) -> dict:
    """What a user gets from the run: routing weights of every router and greedy text."""
    from elrea import ELREA
    from elrea.registry import ROUTERS

    m = ELREA.from_pretrained(run, device="cpu")
    out = {r: [[round(float(x), 5) for x in row] for row in m.route(PROMPTS, router=r)] for r in ROUTERS.names()}
    out["text"] = m.generate(PROMPTS)
    return out


def damages(path: Path) -> list[str]:
    kinds = ["truncate", "random bytes", "delete"]
    if path.suffix == ".json":
        kinds.append("wrong JSON shape")
    if path.suffix == ".safetensors":
        kinds.append("NaN (record rewritten)")
    return kinds


def damage(run: Path, rel: str, kind: str) -> None:
    path = run / rel
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random bytes":
        data = bytearray(path.read_bytes())
        data[-64:] = os.urandom(min(64, len(data)))
        path.write_bytes(bytes(data))
    elif kind == "delete":
        path.unlink()
    elif kind == "wrong JSON shape":
        path.write_text("[1, 2]")
    elif kind == "NaN (record rewritten)":
        import torch
        from safetensors.torch import load_file, save_file

        from elrea.rundir import sha256_file

        tensors = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
                   for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path))
        manifest = json.loads((run / "elrea.json").read_text())
        for st in manifest["stages"].values():
            if rel in st.get("files", {}):
                st["files"][rel] = sha256_file(path)
        (run / "elrea.json").write_text(json.dumps(manifest))


def classify(run: Path, reference: dict) -> tuple[str, str]:
    from elrea.errors import ElreaError

    try:
        got = outputs(run)
    except ElreaError as e:
        return "clear error", str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 - what this benchmark counts
        return "traceback", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return ("unaffected", "") if got == reference else ("silent wrong", "outputs differ from the undamaged run's")


def repair(run: Path, data: Path, overrides: list[str], reference: dict) -> str:
    from elrea.config import load_config
    from elrea.pipeline import fit

    try:
        fit(data, run, load_config(None, overrides))
        return "rebuilt" if outputs(run) == reference else "not rebuilt (outputs differ)"
    except Exception as e:  # noqa: BLE001
        return f"not rebuilt ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="four files only")
    ap.add_argument("--out", default=str(RESULTS / "damage.json"))
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("elrea").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="elrea-damage-"))
    ref, data, overrides = build(tmp)
    reference = outputs(ref)
    files = sorted(str(p.relative_to(ref)) for stage in ("base", "clusters", "experts", "router")
                   for p in (ref / stage).rglob("*") if p.is_file())
    if args.quick:
        files = [f for f in files if f in ("base/adapter_model.safetensors", "clusters/clusters.json",
                                           "experts/2/adapter_model.safetensors", "router/learned.json")]
    cases = []
    for rel in files:
        for kind in damages(ref / rel):
            run = tmp / "case"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(ref, run, ignore=shutil.ignore_patterns(".elrea.lock*"))
            damage(run, rel, kind)
            outcome, detail = classify(run, reference)
            # NaN that the record agrees with is what a diverged training leaves: refusing it is the
            # answer (a re-run would train the same again; the error says to lower the learning rate)
            fixed = "n/a (diverged training)" if kind.startswith("NaN") else repair(run, data, overrides, reference)
            cases.append({"file": rel, "damage": kind, "outcome": outcome, "detail": detail, "repair": fixed})
            log(f"{rel} / {kind}: {outcome}; {fixed}")
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("clear error", "unaffected", "silent wrong", "traceback")}
    repairable = [c for c in cases if not c["repair"].startswith("n/a")]
    counts["rebuilt by re-running fit"] = f"{sum(c['repair'] == 'rebuilt' for c in repairable)} of {len(repairable)}"
    report = {"command": command_line(__file__, argv), "machine": machine(), "cases": cases, "counts": counts,
              "files": len(files), "seconds": round(time.time() - t0, 1)}
    print_table("damaged run files: what loading does, and whether re-running fit repairs", ["outcome", "cases"],
                [[k, v] for k, v in counts.items()] + [["total", len(cases)]])
    bad = [c for c in cases if c["outcome"] in ("silent wrong", "traceback") or c["repair"] not in ("rebuilt", "n/a (diverged training)")]
    if bad:
        print_table("cases to look at", ["file", "damage", "outcome", "repair"],
                    [[c["file"], c["damage"], c["outcome"], c["repair"]] for c in bad])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
