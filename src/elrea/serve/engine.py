"""The serving scheduler: one thread owns the decoding engine and batches requests continuously.

HTTP handlers never touch the model. They `submit` a Job and receive its events through a
callback. The scheduler thread keeps a pool of slots on the engine's static KV cache
(elrea.engine.Slots): between two decoding steps it takes every request that has arrived,
routes the new ones together (one batched backward per router setting), and admits them in
arrival order while their slots are free (a request needs one slot per adapter with weight > 0;
top-1 needs one); they are prefilled and join the running batch at the next step. A request
that finishes, hits a stop sequence or is cancelled frees its slots at once. Requests that do
not fit wait in a bounded queue; past `max_queue` waiting, `submit` raises `QueueFull` (HTTP
503). `batching="static"` is the old policy, kept as the baseline the serving benchmark
compares with: a batch of up to `slots` requests runs until its last row ends, and requests
that arrive meanwhile wait for the whole batch.

Events, in order: ("start", {"weights": [...]}) once routed, ("text", str) as text is final
(text that may begin a stop sequence is held back), then ("done", {"finish_reason",
"prompt_tokens", "completion_tokens"}) or ("error", message). A job cancelled by its client
(`Job.cancel`, when the client went away) gets no further events and is counted in
`stats["cancelled"]`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine import PoolFull, is_text
from ..ensemble import Decoding, sampling
from ..generation import TextStream
from ..routers._similarity import keep_top_k

log = logging.getLogger(__name__)

BATCHING = ("continuous", "static")


class QueueFull(Exception):
    """More requests are waiting than the server's max_queue."""


@dataclass
class Job:
    """One request: its encoded prompt, how to decode it, how to route it, where events go."""

    enc: object                                  # data.Encoded
    decoding: Decoding
    emit: Callable[[str, object], None]          # called on the scheduler thread
    weights: list[float] | None = None           # fixed weights over [base, experts...]
    router: str = "gradient"
    tau: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)  # OpenAI stop sequences (not part of the text)
    stream: bool = False                         # the client reads tokens as they come
    routed: torch.Tensor | None = None           # the weights used, once routed (scheduler thread)

    def cancel(self) -> None:
        """Stop decoding this job at the next step (its client went away, or a stop sequence came)."""
        self.decoding.cancelled = True


class Engine:
    """slots: KV-cache rows (a request takes one per adapter it uses); max_length: columns per
    slot (prompt + new tokens); max_queue: requests allowed to wait; batching: continuous or
    static (the baseline)."""

    def __init__(self, model, slots: int = 16, max_length: int = 1024, max_queue: int = 256,
                 batching: str = "continuous"):
        if batching not in BATCHING:
            raise ValueError(f"batching: unknown {batching!r}; valid: {', '.join(BATCHING)}")
        self.model, self.max_queue, self.batching = model, max_queue, batching
        self.pool = model.engine.slots(slots, max_length, fresh=True)
        self.slots, self.max_length = self.pool.n, self.pool.length
        self._queue: queue.Queue = queue.Queue()
        self._waiting: collections.deque = collections.deque()     # routed or not, not yet admitted
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._counts = {"requests": 0, "batches": 0, "largest_batch": 0, "cancelled": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._queued = 0   # submitted, not yet admitted to the pool
        self._texts: dict[int, _JobText] = {}

    def cache_mib(self) -> float:
        """The KV cache's size once allocated (at the first request), from the model's shapes."""
        cfg = self.model.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * cfg.num_hidden_layers * heads * head_dim * self.model.engine.dtype.itemsize
        return self.slots * self.max_length * per_token / 2 ** 20

    @property
    def stats(self) -> dict:
        """Counters since start (requests admitted, admissions, largest admission, requests
        cancelled by their client, requests refused because the queue was full) and the occupancy
        now: `active` requests decoding, `queued` waiting, `slots` and `slots_free`; how the decode
        step runs: `compile` mode, shapes compiled so far, and why it runs eagerly if it does."""
        st = self.model.engine.stats
        return {**self._counts, "active": len(self._texts), "queued": self._queued, "slots": self.slots,
                "slots_free": len(self.pool.free_rows), "batching": self.batching,
                "compile": self.model.engine.compile, "compiled_shapes": len(st.compiled), "eager_because": st.fallback}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="elrea-engine", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        self.warm_up()
        self._loop()

    def warm_up(self) -> None:
        """Compile the decode step for the pool's shape before the first request needs it (requests
        that arrive meanwhile queue): one 2-token request with the base adapter."""
        engine = self.model.engine
        if engine.compile == "off":
            return
        t = time.perf_counter()
        w = torch.zeros(len(self.model.adapters))
        w[0] = 1.0
        self.pool.add([self.model.tokenizer.pad_token_id] * 2, w, sampling(max_new_tokens=2))
        while self.pool.live():
            self.pool.step(1)
        log.info("decode step compiled (%s) for %d slots x %d tokens in %.1f s%s", engine.compile, self.slots,
                 self.max_length, time.perf_counter() - t,
                 f"; decoding eagerly: {engine.stats.fallback}" if engine.stats.fallback else "")

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued and running jobs, then end the thread."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when max_queue jobs are already waiting."""
        if self._stopping.is_set():
            job.emit("error", "the server is shutting down")
            return
        with self._lock:
            if self._queued >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(f"{self._queued} requests are waiting (the server's --max-queue)")
            self._queued += 1
        self._queue.put(job)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        stopping = False
        while True:
            busy = bool(self.pool.live()) or bool(self._waiting)
            try:
                got = [self._queue.get(timeout=None if not busy and not stopping else 0)]
            except queue.Empty:
                got = []
            while True:
                try:
                    got.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = stopping or any(j is None for j in got)
            self._waiting.extend(j for j in got if j is not None)
            try:
                self._admit()
                if self.pool.live():
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step must not stop the server
                log.exception("decoding step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
            if stopping and not self._waiting and not self.pool.live() and self._queue.empty():
                return

    def _admit(self) -> None:
        """Route the waiting jobs that are not routed yet; admit them in arrival order while slots are free."""
        live = [j for j in self._waiting if not j.decoding.cancelled]
        gone = len(self._waiting) - len(live)
        if gone:
            self._counts["cancelled"] += gone
            with self._lock:
                self._queued -= gone
            self._waiting = collections.deque(live)
        if not self._waiting or (self.batching == "static" and self.pool.live()):
            return
        self._route([j for j in self._waiting if j.routed is None])
        admitted = 0
        while self._waiting:
            job = self._waiting[0]
            if self.pool.rows_needed(job.routed) > self.slots:
                # more adapters than the server has slots: its top-`slots` adapters, renormalised
                # (the response's "elrea.weights" shows the weights used)
                job.routed = keep_top_k(job.routed[None], self.slots)[0]
            try:
                seq = self.pool.add(job.enc.input_ids, job.routed, job.decoding, tag=job)
            except PoolFull:
                break
            except ValueError as e:
                self._waiting.popleft()
                self._dequeued(1)
                job.emit("error", str(e))
                continue
            self._waiting.popleft()
            self._dequeued(1)
            self._texts[seq.q] = _JobText(self.model.tokenizer, job)
            job.emit("start", {"weights": [round(float(x), 6) for x in job.routed]})
            admitted += 1
        if admitted:
            self._counts["requests"] += admitted
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], admitted)

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def _route(self, jobs: list[Job]) -> None:
        """Weights [C+1] per job (job.routed): fixed ones as given, the rest routed in one batch per router setting."""
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            if j.weights is not None:
                j.routed = torch.tensor(j.weights, dtype=torch.float32, device="cpu")
            else:
                groups.setdefault((j.router, j.tau, j.top_k), []).append(j)
        for (router, tau, top_k), group in groups.items():
            try:
                W = self.model.route([j.enc for j in group], router=router, tau=tau, top_k=top_k)
            except Exception as e:  # noqa: BLE001 - a router that fails fails its requests only
                log.exception("routing %d requests failed", len(group))
                for j in group:
                    self._waiting.remove(j)
                    self._dequeued(1)
                    j.emit("error", f"{type(e).__name__}: {e}")
                continue
            for j, w in zip(group, W):
                j.routed = w

    def _step(self) -> None:
        streaming = any(t.job.stream or t.job.stop for t in self._texts.values())
        sync = 1 if streaming or self._waiting else self.model.engine.steps_per_sync
        for events in self.pool.step(sync):
            for seq, tok, reason in events:
                s = self._texts.get(seq.q)
                if s is None:
                    continue
                if reason == "cancelled":
                    if not s.finished:          # by its client: nobody is listening any more
                        self._counts["cancelled"] += 1
                    del self._texts[seq.q]
                    continue
                if not s.finished and is_text(tok, reason, seq.decoding):
                    s.push(tok)
                if s.finished and reason is None:   # a stop sequence appeared: free the slots
                    seq.tag.cancel()
                elif reason is not None:
                    if not s.finished:
                        s.finish("length" if reason == "length" else "stop")
                    del self._texts[seq.q]

    def _fail_all(self, message: str) -> None:
        for q, s in list(self._texts.items()):
            s.job.emit("error", message)
            s.job.cancel()
        self._texts.clear()
        self.pool.reset()


class _JobText:
    """A job's text as it is decoded: sends what is final, cuts at the first stop sequence."""

    def __init__(self, tokenizer, job: Job):
        self.job, self.text = job, TextStream(tokenizer)
        self.acc, self.sent, self.tokens, self.finished = "", 0, 0, False
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token_id: int) -> None:
        self.tokens += 1
        self.acc += self.text.push(token_id)
        hits = [self.acc.find(s) for s in self.job.stop if s in self.acc]
        if hits:
            self.acc = self.acc[:min(hits)]
            self.finish("stop")
            return
        final = len(self.acc) - self.hold  # text that may still become a stop sequence waits
        if final > self.sent:
            self.job.emit("text", self.acc[self.sent:final])
            self.sent = final

    def finish(self, reason: str) -> None:
        if self.sent < len(self.acc):
            self.job.emit("text", self.acc[self.sent:])
            self.sent = len(self.acc)
        self.finished = True
        self.job.emit("done", {"finish_reason": reason, "prompt_tokens": len(self.job.enc.input_ids),
                               "completion_tokens": self.tokens})
