"""python benchmarks/serve.py --run runs/demo  -- elrea serve under 1, 4 and 16 concurrent clients.

Starts `elrea serve RUN` twice on a free loopback port: batched (requests that arrive together
decode together, --max-batch-size 16) and one request at a time (--max-batch-size 1), and
drives each with the real `openai` client from 1, 4 and 16 threads, a bounded number of chat
completions per level (--requests, shared by the threads; loopback only). Reports, side by
side: requests/s, completion tokens/s, p50/p95 latency per request, and the batched server's
gain over one-at-a-time at each concurrency. Every request is routed by its own gradient
(the default) and decoded greedily for --max-tokens tokens (or until EOS).

--quick fits a tiny run in a temporary directory first (for tests; timings mean nothing).
Writes benchmarks/results/serve.json (serve_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a fitted run (default runs/demo, made by `make demo`)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all)")
    ap.add_argument("--quick", action="store_true", help="fit a tiny run first; few requests (for tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.concurrency = 4, 4, [1, 4]
    return args


def prompts(run: Path, n: int) -> list[str]:
    """Instructions from the run's own data directory when it has one (the demo's data/test.jsonl)."""
    for path in (run / "data" / "test.jsonl", run / "data" / "validation.jsonl"):
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            return [r.get("instruction") or r.get("prompt") for r in rows][:n]
    return C.synthetic_instructions(n, seed=0)


def quick_run(tmp: Path) -> Path:
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.testing import make_toy_records, write_jsonl

    data = write_jsonl(tmp / "train.jsonl", make_toy_records(48, seed=0))
    overrides = [f"model.name={C.tiny_model_dir()}", "base.max_steps=2", "experts.max_steps=1", "features.dim=256",
                 "clustering.num_clusters=2", "clustering.min_cluster_size=4", "model.device=cpu"]
    return fit(data, tmp / "run", load_config(None, overrides))


def start_server(run: Path, max_batch: int, threads: int | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "elrea.cli", "-q", "serve", str(run), "--port", str(port),
                             "--max-batch-size", str(max_batch), "--served-model-name", "bench"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1800):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1):
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 180 s")


def load(base: str, texts: list[str], concurrency: int, n: int, max_tokens: int) -> dict:
    """n requests from `concurrency` threads; per-request latency and tokens."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    lock, next_i, records = threading.Lock(), [0], []

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= n:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            r = client.chat.completions.create(model="bench", max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": texts[i % len(texts)]}])
            with lock:
                records.append((time.perf_counter() - t, r.usage.completion_tokens))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in records)
    tokens = sum(k for _, k in records)
    return {"requests": len(records), "seconds": wall, "requests_per_s": len(records) / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]}


def run(args) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="elrea-serve-bench-")
    run_dir = quick_run(Path(tmp.name)) if args.quick else Path(args.run)
    if not (run_dir / "elrea.json").exists():
        raise SystemExit(f"{run_dir}: not a fitted run; run `make demo` first, or pass --run RUN (or --quick)")
    texts = prompts(run_dir, max(args.requests, 16))
    results = {}
    for mode, batch in (("batched", 16), ("one_at_a_time", 1)):
        C.log(f"{mode}: starting elrea serve --max-batch-size {batch} ...")
        proc, base = start_server(run_dir, batch, args.threads)
        try:
            load(base, texts, 1, 1, 2)   # warm-up: first-call costs out of the timings
            results[mode] = {}
            for c in args.concurrency:
                C.log(f"{mode}: {args.requests} requests from {c} client(s) ...")
                results[mode][str(c)] = load(base, texts, c, args.requests, args.max_tokens)
            with urllib.request.urlopen(base + "/health") as r:
                results[mode]["engine"] = json.loads(r.read())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    gain = {str(c): results["batched"][str(c)]["tokens_per_s"] / results["one_at_a_time"][str(c)]["tokens_per_s"]
            for c in args.concurrency}
    return {"benchmark": "serve", "config": {"run": str(run_dir), "requests": args.requests,
                                             "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                                             "quick": args.quick, "client": "openai (threads), loopback"},
            "results": results, "batched_over_one_at_a_time_tokens_per_s": gain}


def show(report: dict):
    r, cs = report["results"], report["config"]["concurrency"]
    rows = []
    for mode in ("batched", "one_at_a_time"):
        for c in cs:
            x = r[mode][str(c)]
            rows.append([f"{mode.replace('_', ' ')}, {c} client(s)", x["requests_per_s"], x["tokens_per_s"],
                         x["p50_s"], x["p95_s"],
                         report["batched_over_one_at_a_time_tokens_per_s"][str(c)] if mode == "batched" else None])
    C.print_table(f"elrea serve, {report['config']['requests']} chat completions per level, "
                  f"{report['config']['max_tokens']} tokens max, {report['config']['run']}",
                  ["server, clients", "requests/s", "tokens/s", "p50 s", "p95 s", "x one-at-a-time"], rows,
                  [f"largest batch seen: {r['batched']['engine']['largest_batch']}", C.machine_note(report)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"command": C.command_line(str(Path(__file__)), argv), "machine": C.machine(), **run(args)}
    show(report)
    C.write_report(Path(args.out) if args.out else C.RESULTS / ("serve_quick.json" if args.quick else "serve.json"),
                   report)
    return report


if __name__ == "__main__":
    main()
