"""python benchmarks/serve_burst.py [--run RUN]  -- elrea serve under a burst of partly malformed requests.

Starts `elrea serve RUN` on a free loopback port (without --run, on a tiny run fitted offline in a
temporary directory, as benchmarks/serve.py --quick does) and fires --requests requests, at most
--concurrency in flight, a --malformed fraction of them malformed: truncated JSON, a body that is
not an object, missing or wrongly typed fields, an unknown model, a negative max_tokens, NaN
routing weights, unsupported logprobs, a text part without text. The well-formed ones are greedy
completions, chats and streamed completions of --max-tokens tokens, each checked against the
same request sent alone. A warm-up burst comes first, so that the measured one sees a warm
allocator. Reports answers by status (2xx / 4xx / 5xx / connection error), unexpected ones (a
well-formed request without its one-at-a-time answer, a malformed one not refused with an OpenAI
error), p50/p95 latency of the well-formed ones, throughput, the server's resident memory (MB)
after start, after the warm-up and after the measured burst, and the engine's occupancy after a
client leaves a long streamed answer (its row must stop: /health `active` back to 0), and
--oversized bodies of --oversized-mb MB sent at once (each must get a 413, /health its answer
within a second throughout).

Writes benchmarks/results/serve_burst.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common and serve, when imported from elsewhere

import _common as C  # noqa: E402
from serve import prompts, quick_run, start_server  # noqa: E402

NAME = "bench"   # the served model name serve.start_server gives
JSON = {"Content-Type": "application/json"}
LONG = "Count to a thousand, one number per line."


@dataclass
class Request:
    path: str
    body: bytes
    stream: bool = False
    malformed: bool = False
    key: int = -1   # a well-formed request's index among the distinct ones (its reference answer)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a fitted run (default: fit a tiny one offline)")
    ap.add_argument("--requests", type=int, default=200, help="requests per burst")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    ap.add_argument("--malformed", type=float, default=0.25, help="fraction of the requests that are malformed")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens per well-formed request")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts (x3: completion, chat, stream)")
    ap.add_argument("--disconnect-tokens", type=int, default=900,
                    help="max_tokens of the streamed request whose client leaves after two chunks")
    ap.add_argument("--oversized", type=int, default=8, help="oversized request bodies sent at once")
    ap.add_argument("--oversized-mb", type=int, default=50, help="MB of each oversized body")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all)")
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/serve_burst.json)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- requests

def well_formed(texts: list[str], max_tokens: int) -> list[Request]:
    """A completion, a chat and a streamed completion per prompt, greedy."""
    out = []
    for t in texts:
        for path, body in (("/v1/completions", {"prompt": t}), ("/v1/completions", {"prompt": t, "stream": True}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": t}]})):
            full = {"model": NAME, "max_tokens": max_tokens, "temperature": 0, **body}
            out.append(Request(path, json.dumps(full).encode(), stream=bool(body.get("stream")), key=len(out)))
    return out


def malformed(adapters: int) -> list[Request]:
    """Requests the server must refuse with a 4xx OpenAI error."""
    def bad(path: str, body) -> Request:
        return Request(path, body if isinstance(body, bytes) else json.dumps(body).encode(), malformed=True)

    user = [{"role": "user", "content": "hi"}]
    nan = ", ".join(["NaN"] + ["0"] * (adapters - 1))
    return [
        bad("/v1/completions", b'{"model": "bench", "prompt": '),
        bad("/v1/completions", b"[1, 2]"),
        bad("/v1/completions", {"model": NAME}),
        bad("/v1/chat/completions", {"messages": user}),
        bad("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}),
        bad("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -3}),
        bad("/v1/completions", {"model": "no-such-model", "prompt": "hi"}),
        bad("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 5}),
        bad("/v1/completions", b'{"model": "bench", "prompt": "hi", "elrea": {"weights": [%s]}}' % nan.encode()),
        bad("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        bad("/v1/chat/completions", {"model": NAME, "messages": []}),
    ]


def mix(good: list[Request], bad: list[Request], n: int, fraction: float) -> list[Request]:
    """n requests, malformed ones spread evenly at `fraction`, each list cycled."""
    out, g, b = [], 0, 0
    for i in range(n):
        if int((i + 1) * fraction) > int(i * fraction):
            out.append(bad[b % len(bad)])
            b += 1
        else:
            out.append(good[g % len(good)])
            g += 1
    return out


def send(base: str, r: Request) -> dict:
    """One request on its own connection: status, seconds, the answer's text (well-formed, 2xx)."""
    u = urlparse(base)
    t = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    try:
        conn.request("POST", r.path, body=r.body, headers=JSON)
        resp = conn.getresponse()
        raw = resp.read().decode()
    except (OSError, http.client.HTTPException) as e:
        return {"status": None, "seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()
    out = {"status": resp.status, "seconds": time.perf_counter() - t}
    if resp.status >= 400:
        try:
            out["error"] = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            out["error"] = raw[:200]   # not an OpenAI error
    elif r.stream:
        chunks = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: ") and x != "data: [DONE]"]
        out["text"] = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        choice = json.loads(raw)["choices"][0]
        out["text"] = choice["message"]["content"] if "message" in choice else choice["text"]
    return out


def expected(r: Request, got: dict, reference: list[str]) -> bool:
    if r.malformed:
        err = got.get("error")
        return got["status"] is not None and 400 <= got["status"] < 500 and isinstance(err, dict) \
            and set(err) == {"message", "type", "param", "code"}
    return got["status"] == 200 and got["text"] == reference[r.key]


# ----------------------------------------------------------------------------- measurements

def burst(base: str, requests: list[Request], concurrency: int, reference: list[str]) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(lambda r: send(base, r), requests))
    wall = time.perf_counter() - t0
    status = [g["status"] for g in got]
    lat = sorted(g["seconds"] for r, g in zip(requests, got) if not r.malformed and g["status"] == 200)
    return {"requests": len(requests), "malformed": sum(r.malformed for r in requests), "seconds": wall,
            "2xx": sum(s is not None and s < 300 for s in status),
            "4xx": sum(s is not None and 400 <= s < 500 for s in status),
            "5xx": sum(s is not None and s >= 500 for s in status),
            "connection_errors": sum(s is None for s in status),
            "unexpected": sum(not expected(r, g, reference) for r, g in zip(requests, got)),
            "requests_per_s": len(requests) / wall,
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))] if lat else None}


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        return json.loads(r.read())


def idle(base: str, within_s: float = 60.0) -> tuple[dict, float]:
    """(/health, seconds waited) once no request is decoding or queued."""
    t0 = time.perf_counter()
    while True:
        h = health(base)
        if (h["active"] == 0 and h["queued"] == 0) or time.perf_counter() - t0 > within_s:
            return h, time.perf_counter() - t0
        time.sleep(0.01)


def rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2 ** 20, 1)


def disconnect(base: str, max_tokens: int) -> dict:
    """A streamed request whose client leaves after two chunks: how soon its row stops."""
    before = idle(base)[0]
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/completions", headers=JSON, body=json.dumps(
        {"model": NAME, "prompt": LONG, "max_tokens": max_tokens, "stream": True, "temperature": 0}))
    resp, chunks = conn.getresponse(), 0
    while chunks < 2:
        line = resp.readline()
        if not line:
            raise RuntimeError(f"the stream ended before two chunks (status {resp.status})")
        chunks += line.startswith(b"data: ")
    during = health(base)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after, waited = idle(base)
    return {"max_tokens": max_tokens, "active_before_leaving": during["active"],
            "active_after": after["active"], "queued_after": after["queued"],
            "seconds_until_idle": waited, "cancelled": after["cancelled"] - before["cancelled"]}


def oversized(base: str, n: int, mb: int) -> dict:
    """`n` authorised requests of `mb` MB bodies at once (half with Content-Length, half chunked)
    while /health is polled every 0.1 s: each must get a 413, and /health its answer within 1 s
    throughout."""
    import threading

    body = b'{"model": "%s", "prompt": "%s"}' % (NAME.encode(), b"a" * (mb << 20))
    u = urlparse(base)
    statuses, lat, done = [], [], threading.Event()

    def one(i: int):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        try:
            if i % 2:   # chunked: no Content-Length to refuse by
                conn.request("POST", "/v1/completions", headers={**JSON, "Transfer-Encoding": "chunked"},
                             body=iter([body[s:s + (1 << 20)] for s in range(0, len(body), 1 << 20)]),
                             encode_chunked=True)
            else:
                conn.request("POST", "/v1/completions", headers=JSON, body=body)
            statuses.append(conn.getresponse().status)
        except OSError as e:
            statuses.append(f"{type(e).__name__}")
        finally:
            conn.close()

    def poll():
        while not done.is_set():
            t = time.perf_counter()
            health(base)
            lat.append(time.perf_counter() - t)
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    seconds = time.perf_counter() - t0
    done.set()
    poller.join()
    return {"requests": n, "mb_each": mb, "status_413": sum(s == 413 for s in statuses),
            "other": [s for s in statuses if s != 413], "seconds": round(seconds, 2),
            "health_polls": len(lat), "health_max_s": round(max(lat), 3) if lat else None}


def run(args) -> dict:
    tmp = tempfile.TemporaryDirectory(prefix="elrea-serve-burst-")
    run_dir = Path(args.run) if args.run else quick_run(Path(tmp.name))
    from elrea.rundir import Run
    if not Run(run_dir).manifest.exists():
        raise SystemExit(f"{run_dir}: not a fitted run (omit --run for a tiny one)")
    C.log(f"starting elrea serve {run_dir} ...")
    proc, base = start_server(run_dir, args.max_batch_size, args.threads)
    try:
        rss = {"started": rss_mb(proc.pid)}
        with urllib.request.urlopen(base + "/v1/models") as r:
            adapters = json.loads(r.read())["data"][0]["adapters"]
        good = well_formed(prompts(run_dir, args.prompts), args.max_tokens)
        C.log(f"{len(good)} distinct well-formed requests, one at a time (the reference answers) ...")
        reference = [send(base, r).get("text") for r in good]
        requests = mix(good, malformed(len(adapters)), args.requests, args.malformed)
        results = {}
        for phase in ("warm_up", "measured"):
            C.log(f"{phase}: {args.requests} requests, {args.concurrency} in flight ...")
            results[phase] = burst(base, requests, args.concurrency, reference)
            idle(base)
            rss[f"after_{phase}"] = rss_mb(proc.pid)
        C.log("a client leaves a long streamed answer ...")
        left = disconnect(base, args.disconnect_tokens)
        C.log(f"{args.oversized} oversized bodies of {args.oversized_mb} MB at once, /health polled ...")
        large = oversized(base, args.oversized, args.oversized_mb)
        rss["after_oversized"] = rss_mb(proc.pid)
        engine = health(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    return {"benchmark": "serve_burst",
            "config": {"run": args.run or "tiny (benchmarks/serve.py quick_run)", "requests": args.requests,
                       "concurrency": args.concurrency, "malformed": args.malformed, "max_tokens": args.max_tokens,
                       "distinct_well_formed": len(good), "max_batch_size": args.max_batch_size,
                       "server_threads": args.threads or "all",
                       "client": "http.client (threads), one connection per request, loopback"},
            "results": results, "rss_mb": rss,
            "rss_growth_measured_burst_mb": round(rss["after_measured"] - rss["after_warm_up"], 1),
            "disconnect": left, "oversized": large, "engine": engine}


def show(report: dict):
    cfg, rss = report["config"], report["rss_mb"]
    rows = [[phase.replace("_", "-"), x["requests"], x["2xx"], x["4xx"], x["5xx"], x["connection_errors"],
             x["unexpected"], x["p50_s"], x["p95_s"], x["requests_per_s"], rss[f"after_{phase}"]]
            for phase, x in report["results"].items()]
    d = report["disconnect"]
    C.print_table(f"elrea serve, bursts of {cfg['requests']} requests ({cfg['malformed']:.0%} malformed), "
                  f"{cfg['concurrency']} in flight, {cfg['max_tokens']} tokens, {cfg['run']}, "
                  f"server torch threads: {cfg['server_threads']}",
                  ["burst", "requests", "2xx", "4xx", "5xx", "conn. errors", "unexpected", "p50 s", "p95 s",
                   "requests/s", "RSS after MB"], rows,
                  [f"RSS: {rss['started']} MB after start; the measured burst grew it by "
                   f"{report['rss_growth_measured_burst_mb']} MB",
                   f"a client leaving a {d['max_tokens']}-token stream after two chunks: rows decoding "
                   f"{d['active_before_leaving']} -> {d['active_after']} in {d['seconds_until_idle']:.3f} s, "
                   f"cancelled: {d['cancelled']}",
                   f"{report['oversized']['requests']} bodies of {report['oversized']['mb_each']} MB at once: "
                   f"{report['oversized']['status_413']} answered 413 in {report['oversized']['seconds']} s; "
                   f"/health's slowest answer meanwhile {report['oversized']['health_max_s']} s; RSS after "
                   f"{rss['after_oversized']} MB",
                   C.machine_note(report)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"command": C.command_line(str(Path(__file__)), argv), "machine": C.machine(), **run(args)}
    show(report)
    C.write_report(Path(args.out) if args.out else C.RESULTS / "serve_burst.json", report)
    return report


if __name__ == "__main__":
    main()
