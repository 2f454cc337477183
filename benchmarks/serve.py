"""python benchmarks/serve.py --run runs/demo  -- elrea serve: continuous vs static batching, 1/16/64 clients.

Starts `elrea serve RUN` on free loopback ports, once per scheduling policy, with the same
--slots (default 16) and --max-length:

- continuous (`--batching continuous`): requests join the running batch at the next decoding
  step and leave it (freeing their slots) as soon as they end;
- static (`--batching static`, the old policy and the baseline): a batch runs until its last
  request ends, and requests that arrive meanwhile wait for the whole batch;
- one at a time (`--slots` = the rows one request needs), only with --one-at-a-time (slow).

Each server is driven by the real `openai` Python client from 1, 16 and 64 threads
(--concurrency). At each level a bounded number of streamed chat completions (--requests,
shared by the threads: by default 16 with one client, else max(64, clients)) is sent; request
i is the same in every mode: prompt i of the run's data/test.jsonl (or --prompts FILE, else
the built-in reasoning-mix test split), greedy, `max_tokens` drawn from a seeded range
(--min-tokens..--max-tokens, default 8..64) so that rows end at different steps, sent with
`elrea.top_k` (--top-k, default 1: one slot per request, so --slots is the number of requests
decoding at once; 0 sends none: the run's routing, a slot per adapter with weight > 0) and,
with --router ROUTER, `elrea.router` (default: the run's router; gradient in the demo, one
batched backward pass per admission on the scheduler thread, which stalls the running rows;
uniform needs none, but ignores top_k: a slot per adapter). --base-only sends fixed weights
instead (the base adapter alone: one slot, no routing pass), to see the batching alone. The
levels run in turn on every server (all started and warmed up first), so that a drifting
machine load hits the modes alike (the order alternates from level to level).

Per mode and level it reports requests/s and completion tokens/s (answered requests and the
usage the server reports, over the level's wall time), p50/p95 latency per request (send to
the last chunk), p50/p95 time to first token (send to the first chunk with text; the role
chunk before it is sent at admission, before any token), and continuous/static ratios of
requests/s, tokens/s, p95 latency and p95 time to first token. It also checks what it gets:
every request answered, usage within max_tokens (finish "length" exactly at max_tokens), the
server idle after each level (/health: active 0, queued 0, every slot free), and how many
answers are the same text as the static server's (greedy: they should be, up to routing
batched differently).

The issue's target is on a GPU: continuous >= 3x static throughput at 64 clients with equal or
better p95 latency. A decode step covers the busy prefix of slots and the columns written so
far (on a CPU, eager, exactly those; compiled, rounded up to powers of two), so --max-length
only bounds a request (256 here: prompt + 64 new tokens fit).

--quick fits a tiny run in a temporary directory first (for tests; timings mean nothing).
Writes benchmarks/results/serve.json (serve_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402

NAME = "bench"   # the served model name
MODES = ("continuous", "static", "one_at_a_time")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a fitted run (default runs/demo, made by `make demo`)")
    ap.add_argument("--prompts", default=None,
                    help="JSONL of {instruction|prompt} (default: RUN/data/test.jsonl, else reasoning-mix test)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="client threads per level")
    ap.add_argument("--requests", type=int, nargs="+", default=None,
                    help="requests per level: one number for every level or one per level "
                         "(default: 16 with one client, else max(64, clients))")
    ap.add_argument("--min-tokens", type=int, default=8, help="max_tokens of a request is drawn in [min, max]")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16, help="--slots of the continuous and static servers")
    ap.add_argument("--max-length", type=int, default=256, help="--max-length of the servers (tokens per slot)")
    ap.add_argument("--top-k", type=int, default=1,
                    help="elrea.top_k sent with every request (default 1; 0 sends none: the run's routing)")
    ap.add_argument("--router", default=None,
                    help="elrea.router sent with every request (default none: the run's router, gradient in the "
                         "demo)")
    ap.add_argument("--base-only", action="store_true",
                    help="send elrea.weights one-hot on the base adapter instead: one slot and no routing pass "
                         "per request (the batching alone)")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also serve one request at a time (--slots = one request's rows); slow")
    ap.add_argument("--seed", type=int, default=0, help="seeds the max_tokens draws")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one request may take")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each server (default: all)")
    ap.add_argument("--quick", action="store_true", help="fit a tiny run first; few requests (for tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.min_tokens, args.max_tokens = [1, 4], [4, 8], 2, 8
    if args.requests is None:
        args.requests = [16 if c == 1 else max(64, c) for c in args.concurrency]
    elif len(args.requests) == 1:
        args.requests = args.requests * len(args.concurrency)
    if len(args.requests) != len(args.concurrency):
        ap.error("--requests: one number, or one per --concurrency level")
    if not 1 <= args.min_tokens <= args.max_tokens:
        ap.error("--min-tokens must be in [1, --max-tokens]")
    return args


def prompts(run: Path, n: int) -> list[str]:
    """Instructions from the run's own data directory when it has one (the demo's data/test.jsonl)."""
    for path in (run / "data" / "test.jsonl", run / "data" / "validation.jsonl"):
        if path.exists():
            return _read_prompts(path)[:n]
    return C.synthetic_instructions(n, seed=0)


def _read_prompts(path: Path) -> list[str]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r.get("instruction") or r.get("prompt") for r in rows]


def bench_prompts(args, run: Path, n: int) -> tuple[list[str], str]:
    """n prompts (cycled if fewer) and where they come from."""
    if args.prompts:
        texts, origin = _read_prompts(Path(args.prompts)), args.prompts
    elif (run / "data" / "test.jsonl").exists() or (run / "data" / "validation.jsonl").exists() or args.quick:
        texts, origin = prompts(run, n), f"{run}/data" if not args.quick else "synthetic (_common)"
    else:
        texts, origin = C.instructions(n, "test", seed=0, quick=False)
    if not texts:
        raise SystemExit(f"no prompts in {origin}")
    return [texts[i % len(texts)] for i in range(n)], origin


def quick_run(tmp: Path) -> Path:
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.testing import make_toy_records, write_jsonl

    data = write_jsonl(tmp / "train.jsonl", make_toy_records(48, seed=0))
    overrides = [f"model.name={C.tiny_model_dir()}", "base.max_steps=2", "experts.max_steps=1", "features.dim=256",
                 "clustering.num_clusters=2", "clustering.min_cluster_size=4", "model.device=cpu"]
    return fit(data, tmp / "run", load_config(None, overrides))


def start_server(run: Path, max_batch: int, threads: int | None, batching: str = "continuous",
                 max_length: int | None = None):
    """`elrea serve RUN` on a free loopback port as model NAME: (process, base URL) once it answers."""
    return wait_ready(*launch_server(run, max_batch, threads, batching, max_length))


def launch_server(run: Path, slots: int, threads: int | None, batching: str = "continuous",
                  max_length: int | None = None):
    """Start `elrea serve` without waiting: (process, base URL). Its stderr goes to a temporary file
    (proc.stderr_path), so that a chatty server never blocks on a full pipe."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "elrea.cli", "-q", "serve", str(run), "--port", str(port),
           "--slots", str(slots), "--batching", batching, "--served-model-name", NAME]
    if max_length:
        cmd += ["--max-length", str(max_length)]
    err = tempfile.NamedTemporaryFile("w+", prefix="elrea-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
    proc.stderr_path = err.name
    err.close()
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, base: str, seconds: float = 300):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {server_log(proc)}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1):
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start in {seconds:.0f} s")


def server_log(proc, tail: int = 2000) -> str:
    try:
        return Path(proc.stderr_path).read_text(errors="replace")[-tail:]
    except (AttributeError, OSError):
        return ""


def stop_server(proc) -> str:
    """SIGTERM, wait, and the tail of its stderr (the file is removed)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = server_log(proc)
    try:
        os.unlink(proc.stderr_path)
    except (AttributeError, OSError):
        pass
    return text


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def wait_idle(base: str, seconds: float = 10.0) -> dict:
    """/health once nothing is active or queued and every slot is free (or after `seconds`)."""
    end = time.monotonic() + seconds
    while True:
        h = get_json(base + "/health")
        if (h["active"] == 0 and h["queued"] == 0 and h["slots_free"] == h["slots"]) or time.monotonic() > end:
            return h
        time.sleep(0.05)


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (nearest rank), None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def requests_for(args, texts: list[str], n: int) -> list[dict]:
    """Request i: prompt i and a seeded max_tokens; the same in every mode and level."""
    rng = random.Random(args.seed)
    return [{"i": i, "prompt": texts[i % len(texts)], "max_tokens": rng.randint(args.min_tokens, args.max_tokens)}
            for i in range(n)]


def one_request(client, req: dict, elrea: dict, t_level: float) -> dict:
    """One streamed chat completion: latency, time to first token, text, usage, finish reason."""
    extra = {"elrea": elrea} if elrea else None
    t0 = time.perf_counter()
    first, parts, usage, finish = None, [], None, None
    stream = client.chat.completions.create(
        model=NAME, max_tokens=req["max_tokens"], temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra,
        messages=[{"role": "user", "content": req["prompt"]}])
    for chunk in stream:
        if chunk.choices:
            ch = chunk.choices[0]
            if ch.delta is not None and ch.delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
                if first is None:   # no text at all (EOS first): the first token is the last
                    first = time.perf_counter() - t0
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    latency = time.perf_counter() - t0
    if usage is None or finish is None:
        raise RuntimeError(f"stream ended without {'usage' if usage is None else 'a finish reason'}")
    return {"i": req["i"], "sent": t0 - t_level, "latency": latency, "ttft": first, "text": "".join(parts),
            "finish": finish, "completion_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
            "max_tokens": req["max_tokens"]}


def load(base: str, reqs: list[dict], concurrency: int, elrea: dict, timeout: float) -> tuple[dict, dict]:
    """Send `reqs` from `concurrency` threads (each takes the next unsent one); (summary, texts by i)."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout)
    lock, next_i, done, errors = threading.Lock(), [0], [], []

    def worker():
        while True:
            with lock:
                if next_i[0] >= len(reqs):
                    return
                req = reqs[next_i[0]]
                next_i[0] += 1
            try:
                r = one_request(client, req, elrea, t0)
            except Exception as e:  # noqa: BLE001 - count it and go on: the report says how many failed
                with lock:
                    errors.append(f"request {req['i']}: {type(e).__name__}: {str(e)[:300]}")
                continue
            with lock:
                done.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    client.close()
    lat = [r["latency"] for r in done]
    ttft = [r["ttft"] for r in done]
    tokens = sum(r["completion_tokens"] for r in done)
    bad_usage = [r["i"] for r in done
                 if not 0 <= r["completion_tokens"] <= r["max_tokens"]
                 or (r["finish"] == "length" and r["completion_tokens"] != r["max_tokens"])
                 or (r["text"] and r["completion_tokens"] == 0)]
    summary = {
        "clients": concurrency, "requests": len(reqs), "answered": len(done), "errors": len(errors),
        "error_examples": errors[:3], "seconds": wall,
        "requests_per_s": len(done) / wall, "tokens_per_s": tokens / wall, "completion_tokens": tokens,
        "max_tokens_sum": sum(r["max_tokens"] for r in reqs),
        "mean_completion_tokens": tokens / len(done) if done else 0.0,
        "finished_by_length": sum(r["finish"] == "length" for r in done),
        "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "max_s": max(lat, default=None),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
        "usage_mismatches": bad_usage,
        "per_request": [[r["i"], round(r["sent"], 3), round(r["ttft"], 3), round(r["latency"], 3),
                         r["completion_tokens"], r["max_tokens"], r["finish"]]
                        for r in sorted(done, key=lambda r: r["i"])],
    }
    return summary, {r["i"]: r["text"] for r in done}


def modes(args, run: Path) -> dict[str, int]:
    """Mode -> --slots. One at a time: the rows one request needs (the server rounds up to a power
    of two, which is always < two requests' rows)."""
    out = {"continuous": args.slots, "static": args.slots}
    if args.one_at_a_time:
        out["one_at_a_time"] = 1 if args.base_only else args.top_k or run_adapters(run)
    return out


def run_adapters(run: Path) -> int:
    """Adapters of a fitted run (base + one expert per cluster), from its elrea.json."""
    from elrea.rundir import Run

    info = json.loads(Run(run).manifest.read_text())
    return 1 + int(info["stages"]["clusters"]["num_clusters"])


def run(args) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="elrea-serve-bench-")
    run_dir = quick_run(Path(tmp.name)) if args.quick else Path(args.run)
    from elrea.rundir import Run
    if not Run(run_dir).manifest.exists():
        raise SystemExit(f"{run_dir}: not a fitted run; run `make demo` first, or pass --run RUN (or --quick)")
    n_max = max(args.requests)
    texts, origin = bench_prompts(args, run_dir, n_max)
    reqs = requests_for(args, texts, n_max)
    elrea = {**({"top_k": args.top_k} if args.top_k else {}), **({"router": args.router} if args.router else {})}
    if args.base_only:
        elrea = {"weights": [1.0] + [0.0] * (run_adapters(run_dir) - 1)}
    servers, results, texts_by = {}, {}, {}
    try:
        plan = modes(args, run_dir)
        for mode, slots in plan.items():   # all at once: the loading overlaps
            C.log(f"starting elrea serve ({mode}, --slots {slots}) ...")
            servers[mode] = launch_server(run_dir, slots, args.threads, "static" if mode == "static" else "continuous",
                                          args.max_length)
        for mode in plan:
            wait_ready(*servers[mode])
        adapters = get_json(servers["continuous"][1] + "/v1/models")["data"][0]["adapters"]
        for mode, (_, base) in servers.items():   # first-call costs (cache allocation) out of the timings
            load(base, reqs[:1], 1, elrea, args.timeout)
            results[mode] = {"server": {"slots_asked": plan[mode], **{k: get_json(base + "/health")[k]
                                                                      for k in ("slots", "batching")}},
                             "levels": {}}
            texts_by[mode] = {}
        for level, (c, n) in enumerate(zip(args.concurrency, args.requests)):
            order = list(servers) if level % 2 == 0 else list(servers)[::-1]   # neither mode always goes first
            for mode in order:
                base = servers[mode][1]
                C.log(f"{mode}: {n} requests from {c} client(s) ...")
                summary, got = load(base, reqs[:n], c, elrea, args.timeout)
                h = wait_idle(base)
                summary["idle_after"] = h["active"] == 0 and h["queued"] == 0 and h["slots_free"] == h["slots"]
                summary["engine_after"] = h
                results[mode]["levels"][str(c)] = summary
                texts_by[mode][str(c)] = got
                C.log(f"{mode}, {c} client(s): {summary['answered']}/{n} answered in {summary['seconds']:.1f} s, "
                      f"{summary['requests_per_s']:.3g} req/s, p95 {summary['p95_s'] or 0:.3g} s")
        for mode, (_, base) in servers.items():
            results[mode]["engine"] = get_json(base + "/health")
    finally:
        for mode, (proc, _) in servers.items():
            log = stop_server(proc)
            if mode in results:
                results[mode]["server"]["stderr_tail"] = log[-1000:]
    for mode in results:   # greedy: the same request gives the same text whatever the batching
        if mode == "static":
            continue
        for c, got in texts_by[mode].items():
            ref = texts_by["static"][c]
            both = [i for i in got if i in ref]
            results[mode]["levels"][c]["same_text_as_static"] = sum(got[i] == ref[i] for i in both)
            results[mode]["levels"][c]["compared_with_static"] = len(both)
    ratios = {}
    for mode in results:
        if mode == "static":
            continue
        ratios[mode] = {}
        for c in map(str, args.concurrency):
            x, s = results[mode]["levels"][c], results["static"]["levels"][c]
            ratios[mode][c] = {k: (x[k] / s[k] if x[k] is not None and s[k] else None)
                               for k in ("requests_per_s", "tokens_per_s", "p95_s", "ttft_p95_s")}
    return {"benchmark": "serve",
            "config": {"run": str(run_dir), "prompts": origin, "concurrency": args.concurrency,
                       "requests": args.requests, "max_tokens_range": [args.min_tokens, args.max_tokens],
                       "slots": args.slots, "max_length": args.max_length, "top_k": args.top_k,
                       "router": "none (--base-only: weights on the base adapter)" if args.base_only
                       else args.router or "the run's",
                       "adapters": adapters, "modes": plan, "seed": args.seed, "quick": args.quick,
                       "client": "openai (threads, streamed chat completions), loopback",
                       "per_request": ["request", "sent_s", "ttft_s", "latency_s", "completion_tokens",
                                       "max_tokens", "finish_reason"]},
            "results": results, "over_static": ratios,
            "continuous_over_static": ratios["continuous"]}


def show(report: dict):
    r, cfg = report["results"], report["config"]
    rows = []
    for mode in [m for m in MODES if m in r]:
        for c in map(str, cfg["concurrency"]):
            x = r[mode]["levels"][c]
            q = report["over_static"].get(mode, {}).get(c, {})
            rows.append([f"{mode.replace('_', ' ')}, {c}", f"{x['answered']}/{x['requests']}",
                         x["requests_per_s"], x["tokens_per_s"], x["p50_s"], x["p95_s"],
                         x["ttft_p50_s"], x["ttft_p95_s"], q.get("requests_per_s"), q.get("tokens_per_s"),
                         q.get("p95_s"), q.get("ttft_p95_s")])
    notes = []
    for mode in [m for m in MODES if m in r]:
        e, lv = r[mode]["engine"], r[mode]["levels"]
        same = [f"{c}: {x['same_text_as_static']}/{x['compared_with_static']}" for c, x in lv.items()
                if "same_text_as_static" in x]
        notes.append(f"{mode}: --slots {r[mode]['server']['slots']}, admissions {e['batches']}, largest "
                     f"{e['largest_batch']}, tokens per answer "
                     + ", ".join(f"{c}: {x['mean_completion_tokens']:.1f}" for c, x in lv.items())
                     + (f"; same text as static {', '.join(same)}" if same else "")
                     + ("" if all(x["idle_after"] for x in lv.values()) else "; NOT IDLE after a level")
                     + ("" if not any(x["usage_mismatches"] for x in lv.values()) else "; USAGE MISMATCHES"))
    notes.append(C.machine_note(report))
    C.print_table(f"elrea serve: continuous vs static batching, --slots {cfg['slots']}, --max-length "
                  f"{cfg['max_length']}, top_k {cfg['top_k'] or 'run'}, router {cfg.get('router', 'run')}, "
                  f"streamed chats of {cfg['max_tokens_range'][0]}..{cfg['max_tokens_range'][1]} tokens max, "
                  f"{cfg['run']}",
                  ["mode, clients", "answered", "req/s", "tok/s", "p50 s", "p95 s", "TTFT p50", "TTFT p95",
                   "x static req/s", "x static tok/s", "x static p95", "x static TTFT p95"], rows, notes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"command": C.command_line(str(Path(__file__)), argv), "machine": C.machine(), **run(args)}
    show(report)
    C.write_report(Path(args.out) if args.out else C.RESULTS / ("serve_quick.json" if args.quick else "serve.json"),
                   report)
    return report


if __name__ == "__main__":
    main()
