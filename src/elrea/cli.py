"""The `elrea` command line. Each command calls one library function and prints a table.

    elrea fit --model smollm2-135m-instruct --data train.jsonl --out runs/demo [key=value ...]
    elrea generate runs/demo --prompt "What is 3 + 4?" --show-weights
    elrea route runs/demo --input prompts.jsonl
    elrea eval runs/demo --data test.jsonl
    accelerate launch -m elrea.cli fit ...   # one process per GPU (see README)
    elrea info runs/demo
    elrea serve runs/demo --port 8000       # OpenAI-compatible server
    elrea config                       # every config field, its default and help
    elrea data export reasoning-mix --out data/mix
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from .errors import ConfigError, ElreaError

log = logging.getLogger("elrea")


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)  # no squeezed columns in logs


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):  # numbers right-aligned, text (names, meanings) left
        t.add_column(c, justify="right" if i and all(_numeric(r[i]) for r in rows) else "left")
    for r in rows:  # escaped: a cell like "elrea[qlora]" is text, not rich markup
        t.add_row(*[escape(f"{v:.3f}" if isinstance(v, float) else str(v)) for v in r])
    _console().print(t)


def _numeric(v) -> bool:
    if isinstance(v, (int, float)) or v in ("-", "", None):
        return True
    try:
        float(str(v).rstrip("%x"))
        return True
    except ValueError:
        return False


def _accuracy_table(title: str, acc: dict):
    sources = list(acc["elrea"]["per_source"])
    _table(title, ["method"] + sources + ["mean over sources", "overall"],
           [[m] + [f"{100 * acc[m]['per_source'][s]:.1f}" for s in sources]
            + [f"{100 * sum(acc[m]['per_source'].values()) / len(sources):.1f}", f"{100 * acc[m]['overall']:.1f}"]
            for m in acc])


# ----------------------------------------------------------------------------- commands

def _overrides(args) -> list[str]:
    """The positional KEY=VALUE overrides, after those that --model and --device stand for."""
    front = [f"model.device={args.device}"] if args.device else []
    front += [f"model.name={args.model}"] if args.model else []
    return front + list(args.overrides)


def cmd_fit(args):
    from .config import load_config
    from .pipeline import fit

    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    options = {"config": args.data_config, "split": args.data_split, "revision": args.data_revision}
    run = fit(args.data, args.out, cfg, from_stage=args.from_stage, until=args.until,
              data_options={k: v for k, v in options.items() if v is not None})
    if _is_main():
        cmd_info(argparse.Namespace(run=run))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _load(args):
    """(ELREA on this process's device, Processes): --device, else the run's model.device."""
    from .rundir import Run

    device, run = args.device, Run(args.run)
    if run.root.exists():  # a damaged run is refused now, before torch and transformers load
        _, config = run.check_loadable(verify=False)
        device = device or config.model.device
    from .api import ELREA
    from .distributed import processes

    procs = processes(device or "auto")
    return ELREA.from_pretrained(args.run, device=procs.device), procs


def _read_prompts(args) -> list:
    from .data import load_records

    if args.prompt is not None:
        return [args.prompt]
    if args.input is None:
        raise ElreaError("give --prompt TEXT or --input prompts.jsonl")
    return [r.messages for r in load_records(args.input, require_response=False)]


def _write_jsonl(path, rows):
    from .rundir import atomic_path

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None or path == "-":
        sys.stdout.write(text)
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("wrote %d rows to %s", len(rows), path)


def cmd_generate(args):
    prompts = _read_prompts(args)  # a bad --input fails before the model loads
    model, procs = _load(args)
    from .distributed import map_batches

    def run(batch):  # route and decode one batch; under N processes each runs its share
        enc = model.encode(batch)  # once, for routing and decoding
        w = model.route(enc, router=args.router, tau=args.tau, top_k=args.top_k)
        outs = model.generate(enc, weights=w, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, mode=args.mode)
        return list(zip(outs, w.tolist()))

    results = map_batches(procs, prompts, model.config.generation.batch_size, run,
                          desc="generating" if len(prompts) > 1 else None)
    if not procs.is_main:
        return
    outs, weights = [o for o, _ in results], [w for _, w in results]
    if args.show_weights:
        _table("routing weights", ["prompt"] + model.adapters,
               [[_short(p)] + [float(x) for x in w] for p, w in zip(prompts, weights)])
    if args.output:
        _write_jsonl(args.output, [{"prompt": _text(p), "output": o,
                                    "weights": [round(float(x), 6) for x in w]}
                                   for p, o, w in zip(prompts, outs, weights)])
    else:
        for o in outs:
            print(o)


def cmd_route(args):
    prompts = _read_prompts(args)
    model, procs = _load(args)
    from .distributed import map_batches
    w = map_batches(procs, prompts, model.config.routing.batch_size,
                    lambda batch: model.route(batch, router=args.router, tau=args.tau,
                                              top_k=args.top_k).tolist(),
                    desc="routing" if len(prompts) > 1 else None)
    if not procs.is_main:
        return
    _write_jsonl(args.output, [{"prompt": _text(p), "weights": [round(float(x), 6) for x in row],
                                "adapters": model.adapters} for p, row in zip(prompts, w)])


def cmd_compare(args):
    from .compare import CompareOptions, compare

    overrides = _overrides(args)
    opt = CompareOptions(routers=tuple(args.routers), checker=args.checker, seed=args.seed,
                         candidates=[[o for o in c.split(",") if o.strip()] for c in args.candidates],
                         tau_grid=tuple(args.tau_grid), top_ks=tuple(args.top_k), budget_curve=not args.no_budget_curve,
                         cluster_settings=[[o for o in c.split(",") if o.strip()] for c in args.cluster_settings])
    report = compare(args.data, args.test, args.out, config=args.config, overrides=overrides,
                     validation=args.validation, options=opt)
    print(f"wrote {Path(args.out) / 'report.md'} and {Path(args.out) / 'compare.json'} "
          f"(ELREA chosen on validation: {report['elrea']['run']}, router {report['elrea']['router']})")


def cmd_eval(args):
    from .data import load_records
    from .evaluation import evaluate_to_file
    from .rundir import Run
    from .tasks import checker

    records = load_records(args.data)
    if args.limit:
        records = records[: args.limit]
    check = checker(args.checker, args.data)  # a missing package fails before the model loads
    out = Path(args.output) if args.output else Run(args.run).eval
    model, procs = _load(args)
    result = evaluate_to_file(model, records, out, check, args.checker, router=args.router,
                              max_new_tokens=args.max_new_tokens, procs=procs)
    if result is None:  # not the main process
        return
    _accuracy_table(f"accuracy (%) on {args.data} ({len(records)} examples)", result["accuracy"])
    print(f"wrote {out}")


def cmd_serve(args):
    try:
        from .serve import serve
    except ImportError as e:
        raise ElreaError(f"elrea serve needs FastAPI and uvicorn ({e}): pip install 'elrea[serve]'") from None
    try:
        serve(args.run, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("ELREA_API_KEY"),
              device=args.device, served_name=args.served_model_name, slots=args.slots, max_length=args.max_length,
              max_queue=args.max_queue, batching=args.batching, compile=args.compile,
              max_body=int(args.max_body_mb * (1 << 20)))
    except (_Terminated, KeyboardInterrupt):
        # uvicorn re-raises the signal it handled: by now in-flight requests have finished
        log.info("server shut down; in-flight requests finished")


def cmd_push(args):
    from .card import push
    from .rundir import Manifest, check_readable

    check_readable(args.run, Manifest.load(args.run))  # not a run, or one being written: a clear error
    files = push(args.run, args.repo_id, private=args.private, token=args.token, dry_run=args.dry_run,
                 include_eval=args.include_eval, base_model=args.base_model, license=args.license)
    _table(f"{'would upload' if args.dry_run else 'uploaded'} to {args.repo_id}", ["file"], [[f] for f in files])


def cmd_info(args):
    from .models import describe_backbone
    from .rundir import Manifest, Run, read_json

    m = Manifest.load(args.run)
    print(f"run {args.run}: backbone {m.data.get('backbone')}, {m.data.get('num_examples')} examples "
          f"from {m.data.get('data')}")
    # exactly which weights: runs fitted before the manifest recorded it are described as they load now
    print(f"backbone weights: {m.data.get('backbone_weights') or describe_backbone(str(m.data.get('backbone')))}")
    from .rundir import resume_hint, stage_status

    stages = m.data.get("stages", {})
    status = {s: stage_status(args.run, m, s) for s in stages}
    _table("stages", ["stage", "status", "seconds"], [[s, status[s], st.get("seconds", "-")] for s, st in stages.items()])
    if "interrupted" in status.values():
        print(f"interrupted: {', '.join(s for s, v in status.items() if v == 'interrupted')}; to finish the run, "
              f"{resume_hint(m)}")
    cpath = Run(args.run).clusters_json
    if cpath.exists():
        from .card import cluster_rows

        cl = read_json(cpath)
        sources, rows = cluster_rows(cl)
        _table(f"clusters (C={cl['num_clusters']}; adapters: base + experts)", ["adapter", "size"] + sources,
               rows)


def cmd_config(args):
    from .config import describe_fields, starter_yaml

    if args.dump is not None:
        text = starter_yaml()
        if args.dump == "-":
            sys.stdout.write(text)
        else:
            from .rundir import atomic_path

            if Path(args.dump).exists() and not args.force:
                raise ElreaError(f"{args.dump} exists; nothing was written. Pass --force to overwrite it, "
                                 "or give another path")

            with atomic_path(args.dump) as tmp:
                tmp.write_text(text, encoding="utf-8")
            print(f"wrote {args.dump} (use it with `elrea fit --config {args.dump}`)")
        return
    sections: dict[str, list] = {}
    for name, default, help_ in describe_fields():
        section, _, field = name.rpartition(".")
        sections.setdefault(section or "run", []).append([field, json.dumps(default), help_])
    for section, rows in sections.items():
        _table(f"{section}  (override: {section + '.' if section != 'run' else ''}FIELD=VALUE)",
               ["field", "default", "meaning"], rows)


BIGBENCH_ONLY = ("bigbench", "tasks", "task", "bbh", "max_chars", "max_response_chars")


def cmd_data_export(args):
    if args.name in RECIPE_NAMES:
        from . import recipes

        _no_bigbench_flags(args)
        paths = recipes.export(args.name, args.out, train=args.train, validation=_or(args.validation, 100),
                               test=_or(args.test, 500), seed=args.seed, hub_dir=args.hub_dir)
        print(f"settings of the paper: {recipes.config_path(args.name)}")
    elif args.name == "bigbench-mix":
        from . import bigbench

        sizes = {k: v for k, v in (("train", args.train), ("validation", args.validation), ("test", args.test))
                 if v is not None}
        paths = bigbench.export(args.out, args.bigbench, n_tasks=_or(args.tasks, 12), bbh=_or(args.bbh, 50),
                                seed=args.seed, include=args.task, max_chars=_or(args.max_chars, 1000),
                                max_response_chars=_or(args.max_response_chars, 100), **sizes)
    else:
        _no_bigbench_flags(args)
        if args.hub_dir is not None:
            raise ConfigError(f"--hub-dir: only for {' and '.join(RECIPE_NAMES)}, not {args.name}")
        from .tasks import export_mixture

        paths = export_mixture(args.name, args.out, train=_or(args.train, 2000), validation=_or(args.validation, 200),
                               test=_or(args.test, 400), seed=args.seed)
    for split, p in paths.items():
        print(f"{split}: {p}")


RECIPE_NAMES = ("paper-math", "less-mix")


def _no_bigbench_flags(args):
    given = [f"--{k.replace('_', '-')}" for k in BIGBENCH_ONLY if getattr(args, k) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only for bigbench-mix, not {args.name}")


def _or(value, default):
    return default if value is None else value


def cmd_demo(args):
    from .demo import run_demo

    import time

    t0 = time.time()
    result = run_demo(args.out, train=args.train, test=args.test, seed=args.seed, overrides=args.overrides,
                      size="full" if args.full else "quick")
    _accuracy_table("demo: accuracy (%) on held-out test data", result["accuracy"])
    print(f"report: {Path(args.out) / 'report.md'} (demo took {(time.time() - t0) / 60:.1f} min)")


def _text(p) -> str:
    return p if isinstance(p, str) else p[-1]["content"]


def _short(p, n=40) -> str:
    t = _text(p).replace("\n", " ")
    return t if len(t) <= n else t[: n - 1] + "…"


# ----------------------------------------------------------------------------- parser

def _version() -> str:
    from . import __version__

    return __version__


def _device_arg(p):
    p.add_argument("--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N (default: the "
                   "run's model.device); under `accelerate launch` each process uses its own GPU")


def _router_arg(p):
    from .registry import ROUTERS

    p.add_argument("--router", choices=ROUTERS.names(),
                   help="router (default: the run's routing.router; see docs/method.md, step 5)")


def _checker_arg(p):
    from .tasks import CHECKER_NAMES

    p.add_argument("--checker", default="auto", choices=CHECKER_NAMES,
                   help="answer check: exact match after normalisation (docs/method.md), or a built-in "
                        "mixture's own checker; auto (default): the mixture's checker for files written by "
                        "`elrea data export`, exact match for any other file")


def build_parser() -> argparse.ArgumentParser:
    from .stages import STAGE_NAMES as STAGES

    ap = argparse.ArgumentParser(prog="elrea", description="Ensembles of Low-Rank Expert Adapters: "
                                 "cluster training examples by gradient, train one LoRA expert per "
                                 "cluster, route and mix them at inference.")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and results (no progress bars)")
    ap.add_argument("--version", action="version", version=f"elrea {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quiet = argparse.ArgumentParser(add_help=False)  # -q after the command too
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and results (no progress bars)")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[quiet], **k)  # noqa: E731

    p = sub.add_parser("fit", help="train base adapter, features, clusters and experts into a run dir")
    p.add_argument("--data", required=True,
                   help="training data: .jsonl/.json/.csv/.parquet, a datasets directory, or a hub id org/name")
    p.add_argument("--data-config", help="hub data set: its configuration (subset) name")
    p.add_argument("--data-split", help="hub data set or DatasetDict directory: the split (default train)")
    p.add_argument("--data-revision", help="hub data set: a branch, tag or commit")
    p.add_argument("--out", required=True, help="run directory (created; re-running resumes)")
    p.add_argument("--model", help="backbone: alias, hub id or directory (default smollm2-135m-instruct)")
    p.add_argument("--config", help="YAML run config (see `elrea config`)")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and the ones after it")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (e.g. --until base trains one LoRA adapter)")
    _device_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lora.rank=16")
    p.set_defaults(func=cmd_fit)

    for name, helptext, fn in [("generate", "ensembled generation", cmd_generate),
                               ("route", "routing weights per prompt, as JSONL", cmd_route)]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="run directory made by `elrea fit`")
        p.add_argument("--prompt", help="one prompt")
        p.add_argument("--input", help="prompts file (records with an instruction; response optional)")
        p.add_argument("--output", metavar="PATH", help=(
            "write JSONL records {prompt, output, weights} to PATH ('-': stdout); default: the generated "
            "texts on stdout, one after another" if name == "generate" else
            "write the JSONL records to PATH (default: stdout)"))
        p.add_argument("--tau", type=float, help="routing temperature (default from the run config)")
        p.add_argument("--top-k", type=int, help="keep the k largest routing weights")
        _router_arg(p)
        _device_arg(p)
        p.set_defaults(func=fn)
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int,
                           help="tokens to generate (default: the run's generation.max_new_tokens)")
            p.add_argument("--temperature", type=float,
                           help="0 = greedy, > 0 samples (default: the run's generation.temperature)")
            p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the run's generation.top_p)")
            p.add_argument("--seed", type=int, help="sampling seed")
            p.add_argument("--mode", default="logits", choices=["logits", "weights"],
                           help="mix expert logits (default) or expert weights inside each layer")
            p.add_argument("--show-weights", action="store_true", help="print the routing weights")

    from .registry import ROUTERS

    p = sub.add_parser("compare", help="does ELREA help on my data? ELREA vs one LoRA (same compute) and "
                       "baselines, settings chosen on validation",
                       description="Fit and evaluate, resumably, on your own files: one LoRA (config epochs), "
                       "one LoRA compute-matched to ELREA's optimizer steps, ELREA with each router (full "
                       "ensemble and top-1), uniform weights, random clusters of the same sizes, and clusters "
                       "by `source` when the data has it. Temperature, top-1, router and each --candidates "
                       "setting are chosen on validation, never on test. Writes OUT/report.md (tables, "
                       "pictures) and OUT/compare.json; OUT/headline.json (the chosen ELREA, lora and lora-matched "
                       "on every test file) comes first, before the other baselines train.")
    p.add_argument("--data", required=True, help="training records")
    p.add_argument("--test", required=True, nargs="+", metavar="TEST",
                   help="test records with responses (and optional source); more files (e.g. held-out tasks: "
                        "bigbench-mix's bbh.jsonl) get tables of their own")
    p.add_argument("--validation", help="validation records (default: 10%% per source carved from --data)")
    p.add_argument("--out", required=True, help="output directory (runs/, evals/, report.md; re-running resumes)")
    p.add_argument("--model", help="backbone (default smollm2-135m-instruct)")
    p.add_argument("--config", help="YAML run config shared by every fit")
    p.add_argument("--routers", nargs="+", default=["gradient", "embedding", "learned"],
                   choices=[r for r in ROUTERS.names() if r != "uniform"], help="routers to compare")
    p.add_argument("--candidates", nargs="+", default=["", "features.center=false"], metavar="OVERRIDES",
                   help="ELREA settings chosen among on validation: comma-separated overrides each, '' = "
                        "the config itself (default: '' features.center=false: elrea's centred features and the paper's)")
    p.add_argument("--cluster-settings", nargs="*", default=["clustering.signal=full"], metavar="OVERRIDES",
                   help="settings whose clusters are only reported against sources (features + clusters, no "
                        "experts): comma-separated overrides each (default: clustering.signal=full)")
    p.add_argument("--tau-grid", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                   help="routing temperatures tried on validation")
    p.add_argument("--top-k", nargs="*", type=int, default=[1, 2], metavar="K",
                   help="sparse ensembles tried on validation besides all experts: top-1 (one adapter per prompt), "
                        "and top-K at the temperature best for all experts; the base adapter is one of the C + 1 "
                        "weights, so K up to C (default: 1 2)")
    p.add_argument("--no-budget-curve", action="store_true",
                   help="skip elrea-half (the chosen ELREA setting refitted at half the epochs, which draws accuracy "
                        "against optimizer steps beside one LoRA's; one more fit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the carved validation split and random clusters")
    _checker_arg(p)
    _device_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every fit (put them before the options that take several values)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="exact-match accuracy of the ensemble and of the base adapter")
    p.add_argument("run")
    p.add_argument("--data", required=True, help="test records with responses (and optional source)")
    p.add_argument("--output", help="JSON results (default RUN/eval.json)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    _checker_arg(p)
    _router_arg(p)
    p.add_argument("--max-new-tokens", type=int)
    _device_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)",
                       description="Serve a run over the OpenAI API: /v1/models, /v1/completions, "
                       "/v1/chat/completions (stream: true for server-sent events), /health. Each request "
                       "is routed by its own gradient unless its \"elrea\" field sets weights, router or top_k.")
    p.add_argument("run", help="run directory made by `elrea fit`")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (or set ELREA_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--slots", "--max-batch-size", type=int, default=16,
                   help="KV-cache slots decoding at once (default 16, rounded up to a power of two); a request "
                   "takes one per adapter with weight > 0 (top_k=1: one). 1 serves one request at a time")
    p.add_argument("--max-length", type=int, default=1024,
                   help="tokens per slot, prompt + completion (default 1024, rounded up to a power of two; "
                   "at most the model's context). The KV cache is slots x max-length")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait for slots; past it the server answers 503 (default 256)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB (default 4); larger ones get 413 before they are read whole")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                   help="continuous (default): requests join and leave the running batch at every step; "
                   "static: a batch runs until its last request ends (the old policy, for comparison)")
    p.add_argument("--compile", choices=["auto", "off", "default", "reduce-overhead", "max-autotune", "dynamo"],
                   help="torch.compile the decode step (default: the run's generation.compile, auto = CUDA graphs "
                   "on a GPU, eager on a CPU); compiled once at start, before the first request")
    _device_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness with the elrea backend (MMLU, BBH, ...)",
                       description="Runs lm-eval's own command line with --model elrea: e.g. `elrea lm-eval "
                       "--model_args run=runs/mix,device=cuda --tasks mmlu --batch_size auto`. model_args: run, "
                       "device, dtype, batch_size, max_batch_size, router, top_k, tau, max_length, add_bos_token "
                       "(lm-eval's --batch_size N or auto works too; its default is 1). Everything after `lm-eval` "
                       "goes to lm-eval (see `elrea lm-eval run --help`). Needs pip install 'elrea[eval]'.")
    p.set_defaults(func=lambda a: sys.exit(cmd_lm_eval([])))

    p = sub.add_parser("push", help="upload a run (adapters, clusters, model card) to the Hugging Face Hub")
    p.add_argument("run", help="run directory made by `elrea fit`")
    p.add_argument("repo_id", help="the hub model repository, e.g. you/my-elrea")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="hub token (default: HF_TOKEN or `huggingface-cli login`)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the copy that would be uploaded (in a temporary folder) and list its files; "
                        "upload nothing, change nothing in RUN")
    p.add_argument("--include-eval", action="store_true",
                   help="also upload eval.json: every test prompt, reference and output (your test set); "
                        "the card's accuracy table is uploaded either way")
    p.add_argument("--base-model", metavar="ORG/NAME",
                   help="the backbone's hub id, when the run names a local directory (default: the built-in "
                        "model's or a hub cache folder's id, else the directory's name)")
    p.add_argument("--license", metavar="ID",
                   help="the card's license (default: the backbone's when known, e.g. apache-2.0 for SmolLM2; "
                        "else other)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("info", help="backbone, stages, cluster sizes and source mix")
    p.add_argument("run")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="fit + evaluate + report on the embedded model and built-in data")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--full", action="store_true",
                   help="the full demo: 320 training and 128 test examples instead of 160 and 64 (about twice "
                        "the time; `make demo FULL=1`)")
    p.add_argument("--train", type=int, help="training examples (default 160, or 320 with --full)")
    p.add_argument("--test", type=int, help="test examples (default 64, or 128 with --full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="every config field with its default and meaning; --dump a starter YAML")
    p.add_argument("--dump", nargs="?", const="-", metavar="PATH",
                   help="write a starter YAML with every default and its meaning (to PATH, or stdout)")
    p.add_argument("--force", action="store_true", help="with --dump PATH: overwrite PATH if it exists")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data", help="built-in data sets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export", help="write train/validation/test JSONL of a built-in mixture",
                        description="Write train/validation/test JSONL (and bbh.jsonl for bigbench-mix), a README "
                                    "and mixture.json (for the checker 'auto') into --out.",
                        epilog="examples:\n  elrea data export reasoning-mix --out data/mix\n"
                               "  elrea data export bigbench-mix --out data/bb --tasks 12 --train 300\n"
                               "  elrea data export bigbench-mix --out data/bb --bigbench ~/bigbench-1.0.0.tar.gz "
                               "--task word_unscrambling --task implicatures",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    from .tasks import EXTERNAL_MIXTURES, MIXTURES

    e.add_argument("name", choices=[*MIXTURES, *EXTERNAL_MIXTURES], help="which mixture")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--train", type=int, help="training records (default 2000; bigbench-mix: per task, 300; "
                   "paper recipes: per source, all)")
    e.add_argument("--validation", type=int, help="validation records (default 200; bigbench-mix: per task, 30; "
                   "paper recipes: per source, 100)")
    e.add_argument("--test", type=int, help="test records (default 400; bigbench-mix: in-distribution, per task, 60; "
                   "paper recipes: per source, 500)")
    e.add_argument("--seed", type=int, default=0)
    b = e.add_argument_group("bigbench-mix")
    b.add_argument("--bigbench", metavar="PATH", help="the bigbench-1.0.0 sdist (.tar.gz) or the folder it unpacks "
                   "to (default: fetched once from the package index into elrea's cache)")
    b.add_argument("--tasks", type=int, help="training tasks, drawn with --seed among those with enough examples "
                   "(default 12)")
    b.add_argument("--task", action="append", metavar="NAME", help="a training task by name (repeat; instead of --tasks)")
    b.add_argument("--bbh", type=int, help="held-out BIG-Bench-Hard records per BBH task (default 50)")
    b.add_argument("--max-chars", type=int, help="longest instruction kept, in characters (default 1000)")
    b.add_argument("--max-response-chars", type=int, help="longest response kept (default 100)")
    h = e.add_argument_group("paper-math, less-mix (the paper's recipes; online, or a local copy)")
    h.add_argument("--hub-dir", metavar="DIR", help="read the hub data sets from DIR/<org>/<name>/ (the hub's "
                   "layout) instead of the hub")
    e.set_defaults(func=cmd_data_export)
    return ap


def cmd_lm_eval(argv: list[str]) -> int:
    """lm-evaluation-harness's own command line, with the elrea backend registered."""
    try:
        from .integrations.lm_eval import main as lm_eval_main
    except ImportError as e:
        print(f"elrea: error: elrea lm-eval needs lm-evaluation-harness ({e}): pip install 'elrea[eval]'",
              file=sys.stderr)
        return 2
    try:
        return lm_eval_main(argv)
    except ElreaError as e:
        print(f"elrea: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"] and argv[1:2] not in (["-h"], ["--help"]):  # lm-eval parses its own options
        return cmd_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    # one voice per job: under accelerate launch / torchrun only the main process logs progress
    level = logging.WARNING if getattr(args, "quiet", False) or not _is_main() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate", "httpx", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with _library_bars(level == logging.INFO):
            args.func(args)
    except ElreaError as e:
        print(f"elrea: error: {_who()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("elrea: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except _Terminated:
        # torchrun / accelerate launch stop every process of a job when one of them fails
        _close_progress_bars()
        print(f"elrea: {_who()}stopped by SIGTERM; re-run the same command to resume", file=sys.stderr)
        return 143
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Under accelerate launch / torchrun: every process done, destroy the process group before the
    interpreter exits. Left to the interpreter's teardown, gloo's worker threads can abort a
    process whose work is finished (SIGABRT, "terminate called without an active exception",
    pytorch/pytorch#190489), and the launcher then reports the whole job failed."""
    if "torch" not in sys.modules:   # nothing set one up (and light commands stay light)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def _library_bars(show: bool):
    """With -q (or off the main process) the libraries' own bars (transformers' "Loading weights")
    go too, not just elrea's; put back afterwards for in-process callers."""
    if show:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _close_progress_bars() -> None:
    """Close the bars an interrupted loop left open (Trainer's among them), so that they are not
    redrawn at exit after the last message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that `finally` blocks run and files close."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _who() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"process {os.environ.get('RANK', '0')} of {world} " if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
