"""The serving engine: one thread owns the model and decodes the requests that arrive together
as one batch.

HTTP handlers never touch the model. They `submit` a Job and receive its events through a
callback; the engine thread takes every queued job (up to `max_batch_size`, after waiting
`batch_window_s` for others to arrive), routes them together (one batched backward per router
setting), and decodes them together through the grouped-LoRA ensemble, one step at a time, each
job with its own sampling settings, weights and stop sequences. Jobs that arrive while a batch
decodes form the next batch. With max_batch_size=1 the engine serves one request at a time
(the baseline the serving benchmark compares with).

Events, in order: ("start", {"weights": [...]}) once routed, ("text", str) as text is final
(text that may begin a stop sequence is held back), then ("done", {"finish_reason",
"prompt_tokens", "completion_tokens"}) or ("error", message). A job cancelled by its client
(`Job.cancel`, when the client went away) gets no further events: its row stops at the next
decoding step and is counted in `stats["cancelled"]`. The batch is static, so a row that stops
early is idle until the batch ends; a batch ends as soon as every row has stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ensemble
from ..generation import TextStream

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: its encoded prompt, how to decode it, how to route it, where events go."""

    enc: object                                  # data.Encoded
    decoding: ensemble.Decoding
    emit: Callable[[str, object], None]          # called on the engine thread
    weights: list[float] | None = None           # fixed weights over [base, experts...]
    router: str = "gradient"
    tau: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)  # OpenAI stop sequences (not part of the text)

    def cancel(self) -> None:
        """Stop decoding this job at the next step (its client went away, or a stop sequence came)."""
        self.decoding.cancelled = True


class Engine:
    def __init__(self, model, max_batch_size: int = 16, batch_window_s: float = 0.005):
        self.model, self.max_batch_size, self.batch_window_s = model, max_batch_size, batch_window_s
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._counts = {"requests": 0, "batches": 0, "largest_batch": 0, "cancelled": 0}
        self._queued_lock = threading.Lock()
        self._queued = 0   # submitted, not yet taken into a batch
        self._active = 0   # rows of the running batch still decoding (written by the engine thread only)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start (requests decoded, batches, largest batch, requests cancelled by
        their client) and the occupancy now: `active` rows decoding, `queued` jobs waiting."""
        return {**self._counts, "active": self._active, "queued": self._queued}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="elrea-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued and running jobs, then end the thread."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            job.emit("error", "the server is shutting down")
            return
        with self._queued_lock:
            self._queued += 1
        self._queue.put(job)

    def _take(self, timeout: float | None = None) -> Job | None:
        """The next queued job, or None for the stop signal; queue.Empty after `timeout`."""
        job = self._queue.get(timeout=timeout)
        if job is not None:
            with self._queued_lock:
                self._queued -= 1
        return job

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            first = self._take()
            if first is None:
                if self._queue.empty():
                    return
                continue
            jobs = [first]
            deadline = time.monotonic() + self.batch_window_s
            while len(jobs) < self.max_batch_size:
                try:
                    nxt = self._take(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # keep the stop signal for after this batch
                    break
                jobs.append(nxt)
            live = [j for j in jobs if not j.decoding.cancelled]   # clients that left while queued
            self._counts["cancelled"] += len(jobs) - len(live)
            jobs = live
            if not jobs:
                continue
            self._counts["requests"] += len(jobs)
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(jobs))
            self._active = len(jobs)
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the server
                log.exception("batch of %d requests failed", len(jobs))
                for j in jobs:
                    j.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self._active = 0

    def _route(self, jobs: list[Job]) -> torch.Tensor:
        """Weights [B, C+1]: fixed ones as given, the rest routed in one batch per router setting."""
        W = torch.zeros(len(jobs), len(self.model.adapters), device="cpu")
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            if j.weights is not None:
                W[i] = torch.tensor(j.weights, dtype=torch.float32, device="cpu")
            else:
                groups.setdefault((j.router, j.tau, j.top_k), []).append(i)
        for (router, tau, top_k), idx in groups.items():
            W[idx] = self.model.route([jobs[i].enc for i in idx], router=router, temperature=tau, top_k=top_k)
        return W

    def _run(self, jobs: list[Job]) -> None:
        W = self._route(jobs)
        streams = [_JobText(self.model.tokenizer, j) for j in jobs]
        for j, w in zip(jobs, W):
            j.emit("start", {"weights": [round(float(x), 6) for x in w]})
        steps = ensemble.decode_steps(self.model.model, [j.enc.input_ids for j in jobs], W, self.model.adapters,
                                      [j.decoding for j in jobs], self.model.tokenizer.pad_token_id)
        for tokens, reasons in steps:
            for j, s, tok, reason in zip(jobs, streams, tokens, reasons):
                if tok is None:
                    continue
                if reason is not None:
                    self._active -= 1
                if s.finished:
                    continue
                if reason == "cancelled":   # by its client: nobody is listening any more
                    self._counts["cancelled"] += 1
                    continue
                if ensemble.is_text(tok, reason, j.decoding):
                    s.push(tok)
                if s.finished:          # a stop sequence appeared: this row stops next step
                    j.cancel()
                elif reason is not None:
                    s.finish("length" if reason == "length" else "stop")


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
