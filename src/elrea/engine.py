"""The decoding engine: the one owner of the PEFT model's adapters and of the KV cache.

`Ensemble` wraps the PeftModel that holds every adapter of a run. Everything that decodes,
scores or switches adapters goes through it: `ELREA` (text, routers, formatting), `elrea
serve`, the lm-eval backend and `elrea compare`. It decodes on a pool of slots (`Slots`):

- a static KV cache (elrea.kvcache.SlotCache), S slots x L columns, allocated once per
  (S, L) bucket; no tensor grows while decoding;
- each request takes one slot per adapter with weight > 0 (the ensemble of docs/method.md,
  step 6), or one slot whose LoRA mixes the adapters inside the layers (mode "weights"); a
  row's adapter is a selector row on the device (elrea.fastlora.Stacked), so one decode step
  is the same graph whatever the routing;
- the rows' logits are mixed per request on the device, l_q = sum_{rows r of q} w_r logits_r,
  then each request's transformers processors, greedy or sampled choice, EOS, length and stop
  strings run on the device too; tokens come to the host every `sync_every` steps on a GPU
  (every step when a caller streams, and on a CPU, where the host is the device);
- where a request asks (transformers' output_scores / output_logits), each step's mixed scores
  after its processors, and the mixed logits before them, are kept for it (`decode`);
- requests join (prefill, then the next step) and leave (their slots are free at the next
  host sync) at any time: the server's continuous batching is this pool;
- in a static batch, requests with the same prompt share their rows (one per adapter) until
  their tokens part, when the row forks (`Slots`): several routings of the same prompts cost
  one prefill and their distinct continuations;
- the decode step is compiled with torch.compile where that pays (`compile="auto"`: CUDA
  graphs on a GPU, eager on a CPU), once per (S, L) bucket; a failed compile falls back to
  eager and says once why.

With one adapter at weight 1 this is exactly that adapter's own decoding (tests check it
against PEFT's generate). Layers that stacking does not cover (DoRA, quantized, ...) run
PEFT's mixed-adapter batches (`adapter_names`) on the same slots, uncompiled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from . import fastlora
from .ensemble import Decoding, is_text, left_pad, mix_in_layers, sampling
from .features import position_ids_from_mask
from .kvcache import SlotCache
from .models import model_device

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune", "dynamo")


def bucket(n: int, least: int = 1) -> int:
    """The power of two >= n (and >= least): the shapes the engine compiles for."""
    b = least
    while b < n:
        b *= 2
    return b


class PoolFull(Exception):
    """Not enough free slots for a request now (the server queues it)."""


@dataclass
class Seq:
    """A request in the pool: its request index q, its rows (slots), how it decodes."""

    q: int
    rows: list[int]
    prompt: list[int]
    decoding: Decoding
    weights: torch.Tensor              # (K,) on the CPU
    mix: bool = False                  # one row mixing the adapters inside the layers
    tag: object = None
    hcol: int = 0            # columns of its history written so far (host mirror)
    col: int = 0             # the column its rows write next (host mirror of Slots.cols)
    done: bool = False
    reason: str | None = None
    tokens: int = 0
    budget: int | None = None          # new tokens it may make (Slots.add sets it)
    deferred: bool = False             # left the pool to go on later (Slots._part)
    scores: list = field(default_factory=list)   # (V,) per token, on the device, when decoding.output_scores
    logits: list = field(default_factory=list)   # (V,) per token, on the device, when decoding.output_logits


@dataclass
class Decoded:
    """One prompt's decoding as transformers' generate reports it: every id chosen (the EOS id
    that ended it included), why it ended, and per id the mixed scores after the processors and
    the raw mixed logits, (V,) float32 on the device (empty unless its Decoding asks)."""

    ids: list[int]
    reason: str | None
    scores: list[torch.Tensor]
    logits: list[torch.Tensor]
    decoding: Decoding

    @property
    def text_ids(self) -> list[int]:
        """The ids that are text: without the EOS id that ended it (ensemble.is_text)."""
        ended_on_eos = self.reason == "stop" and self.ids and self.ids[-1] in self.decoding.eos_ids
        return self.ids[:-1] if ended_on_eos else self.ids


@dataclass
class Stats:
    compiled: list = field(default_factory=list)      # (S, L) buckets compiled
    fallback: str | None = None                        # why decoding runs eagerly, if it does
    steps: int = 0
    prefills: int = 0
    prefill_rows: int = 0                              # (prompt, adapter) rows prefilled
    decode_rows: int = 0                               # rows computed by decode steps, summed over steps
    forks: int = 0                                     # rows copied where requests sharing them parted
    moves: int = 0                                     # rows moved down to shorten the busy prefix


class Ensemble:
    """The PeftModel `model` with adapters `names` (in weight-column order), decoding and scoring.

    compile: "auto" (reduce-overhead on CUDA, off elsewhere), "off", a torch.compile mode
    ("default", "reduce-overhead", "max-autotune"), or "dynamo" (traced, not code-generated:
    checks the step compiles, for tests). sync_every: decode steps between host syncs when no
    caller streams.
    """

    def __init__(self, model, names: list[str], pad_id: int, compile: str = "auto", sync_every: int = 8):
        self.model, self.names, self.pad_id = model, list(names), pad_id
        self._added_names: list[str] = []   # adapters added for a while (extra_adapter, arrow): the last columns
        self.device = model_device(model)
        self.dtype = _model_dtype(model)
        self.set_compile(compile)
        self.sync_every = sync_every
        # on a CPU the host is the device: reading tokens every step costs nothing, ends a batch at
        # its last token and frees finished requests' rows at once (tests turn it off to check
        # that syncs in chunks decode the same)
        self.cpu_syncs_every_step = True
        # a call's requests of the same prompt share rows (Slots); when their choices part, the pool
        # may grow to this many times the slots of its distinct rows, then requests wait their turn
        self.share_growth = 2
        self.stats = Stats()
        self._stack: fastlora.Stacked | None = None
        self._stack_checked = False
        self._pool: Slots | None = None
        self._warned = False
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._head_hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        attn = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager", None):
            raise ValueError(f"the decoding engine needs attn_implementation 'sdpa' or 'eager' (custom masks), "
                             f"the model uses {attn!r}; load it with attn_implementation='sdpa'")

    @property
    def steps_per_sync(self) -> int:
        """Decode steps between host syncs when nobody streams: sync_every, or 1 on a CPU."""
        return 1 if self.device.type == "cpu" and self.cpu_syncs_every_step else self.sync_every

    def set_compile(self, mode: str) -> None:
        """How the decode step runs from now on (see the class docstring); pools already built keep theirs."""
        if mode not in COMPILE_CHOICES:
            raise ValueError(f"compile: unknown {mode!r}; valid: {', '.join(COMPILE_CHOICES)}")
        self.compile = mode if mode != "auto" else ("reduce-overhead" if self.device.type == "cuda" else "off")

    # ------------------------------------------------------------------ adapters

    @property
    def stack(self) -> fastlora.Stacked | None:
        """The stacked LoRA factors of every adapter, or None where PEFT's mixed batches are needed."""
        if not self._stack_checked:
            self._stack_checked = True
            if fastlora.supported(self.model, self.names):
                self._stack = fastlora.Stacked(self.model, self.names)
        return self._stack

    def close(self) -> None:
        """Give the PEFT model back as it was (PEFT's own forward on every LoRA layer, no hook
        on its output layer)."""
        self._restack()
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def _restack(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._stack_checked, self._pool = None, False, None

    def column(self, name: str) -> int:
        return self.names.index(name)

    def weights(self, weights, rows: int | None = None) -> torch.Tensor:
        """`weights` as a float32 CPU tensor [rows, K], K = len(names). Weights over the adapters
        the engine had before `extra_adapter` / `arrow` added theirs get zero columns for those
        (a routed method decoding beside an added adapter); any other width is refused, never
        read in part."""
        w = torch.as_tensor(weights, dtype=torch.float32, device="cpu")
        if rows is None:
            rows = w.shape[0] if w.dim() >= 2 else 1
        w = w.reshape(rows, -1)
        k, before = len(self.names), len(self.names) - len(self._added_names)
        if w.shape[1] == before and before < k:
            w = torch.cat([w, w.new_zeros(w.shape[0], k - before)], dim=1)
        if w.shape[1] != k:
            raise ValueError(f"weights have {w.shape[1]} columns; this engine's adapters are {k}: {self.names}")
        return w

    def one_hot(self, name: str, n: int) -> torch.Tensor:
        """Weights [n, K] that give every prompt to adapter `name` alone."""
        w = torch.zeros(n, len(self.names))
        w[:, self.column(name)] = 1.0
        return w

    @contextlib.contextmanager
    def extra_adapter(self, path, name: str):
        """Load a PEFT adapter folder as one more adapter (last weight column) while inside."""
        with self._added(name, lambda: self.model.load_adapter(str(path), adapter_name=name)):
            yield name

    @contextlib.contextmanager
    def _added(self, name: str, add):
        """Run add() (which puts adapter `name` on the PEFT model) and make it the last weight
        column while inside; on the way out delete it and give the others back as they were."""
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already loaded")
        self._restack()
        add()
        self.model.eval()
        self.names.append(name)
        self._added_names.append(name)
        try:
            yield
        finally:
            self.names.remove(name)
            self._added_names.remove(name)
            self._restack()
            self.model.set_adapter(self.names[0])
            self.model.delete_adapter(name)

    @contextlib.contextmanager
    def arrow(self, experts: list[str], top_k: int = 3, tau: float = 1.0, seed: int = 0,
              name: str = "arrow_router"):
        """PEFT's Arrow routing over the adapters `experts` (peft.ArrowConfig: training-free, per
        token and per layer, the top_k experts whose prototype - the top right singular vector of
        its B A - best matches the token's hidden state) as one more adapter `name` while inside;
        decode with one_hot(name, n). What `create_arrow_model` builds, on the adapters already
        loaded here. Rows then run PEFT's own forward (mixed batches), not the stacked one."""
        from peft import ArrowConfig, LoraConfig
        from peft.tuners.lora.arrow import (check_loaded_lora_compatibility_arrow,
                                            ensure_adapters_target_linear_layers_only)

        unknown = [e for e in experts if e not in self.names]
        if unknown or not experts:
            raise ValueError(f"arrow: adapters {unknown or experts} are not loaded; loaded: {self.names}")
        cfg = ArrowConfig(top_k=min(top_k, len(experts)), router_temperature=tau, rng_seed=seed)
        cfg.task_adapter_names, cfg.gks_adapter_names = list(experts), []
        targets, rank = check_loaded_lora_compatibility_arrow(self.model, adapter_names=list(experts))
        ensure_adapters_target_linear_layers_only(self.model, adapter_names=list(experts))
        with self._added(name, lambda: self.model.add_adapter(
                name, LoraConfig(arrow_config=cfg, target_modules=targets, r=rank))):
            yield name

    @contextlib.contextmanager
    def only(self, name: str):
        """PEFT's own forward with adapter `name` active (gradient features train through it)."""
        self.model.set_adapter(name)
        yield self.model

    def adapters_off(self):
        """The backbone alone (context manager): what the learned router reads."""
        return fastlora.adapters_off(self.model)

    # ------------------------------------------------------------------ decoding

    def slots(self, n: int, length: int, fresh: bool = False, requests: int | None = None) -> "Slots":
        """A pool of n slots x length columns (both rounded up to powers of two) for at least
        `requests` requests (default n), reused by the next call while the columns and adapters
        stay the same and its slots suffice (a larger pool costs no compute: steps cover the busy
        slots only); fresh=True: a pool of the caller's own (a server's, which nothing else may
        reset)."""
        n, length = bucket(n), bucket(length, 64)
        requests = bucket(max(n, requests or 0))
        if fresh:
            return Slots(self, n, length, requests)
        p = self._pool
        if p is None or p.length != length or p.n < n or p.nq < requests:
            self._pool = None
            self._pool = Slots(self, n, length, requests)
        self._pool.reset()
        return self._pool

    def decode_steps(self, prompts: list[list[int]], weights: torch.Tensor, decodings, mix: bool = False,
                     stream: bool = False):
        """Ensembled decoding of a batch: yields (tokens, reasons) after every step.

        tokens[b]: the id chosen for prompt b at this step (None once b had finished); reasons[b]:
        why b finished at this step ("stop", "length", "cancelled") or None. weights [B, K] over
        `names`; each prompt its own Decoding (or one for all). mix=True mixes the adapters inside
        the layers (one row per prompt). stream: sync with the host every step."""
        for tokens, reasons, _ in self._steps(prompts, weights, decodings, mix, stream):
            yield tokens, reasons

    def _steps(self, prompts, weights, decodings, mix, stream):
        """decode_steps, also yielding the batch's requests (Seq, in prompt order): what they kept
        (scores, logits) up to this step."""
        B = len(prompts)
        specs = decodings if isinstance(decodings, list) else [decodings] * B
        weights = self.weights(weights, B)
        if mix and self.stack is None:           # PEFT's weighted adapters, one per prompt
            yield from self._decode_mixed_peft(prompts, weights, specs, stream)
            return
        # requests of the same prompt share their rows until their choices part (Slots): the pool
        # holds the distinct (prompt, adapter) rows, and forks may take it to share_growth times
        # that (never more than every row alone): an eager pool grows when they need it, a compiled
        # one has that room from the start (its graphs are for its tensors); past it, the requests
        # that part wait their turn
        distinct: dict[tuple, set] = {}
        for p, w in zip(prompts, weights):
            distinct.setdefault(tuple(p), set()).update(torch.nonzero(w > 0).flatten().tolist())
        every = B if mix else int((weights > 0).sum())
        rows = B if mix else sum(len(c) for c in distinct.values())
        room = min(every, self.share_growth * rows)
        longest = max(len(p) for p in prompts) + max(s.max_new_tokens for s in specs)
        compiled = self.compile != "off"
        pool = self.slots(room if compiled else rows, longest, requests=B)
        pool.grow_to = pool.n if compiled else max(pool.n, bucket(room))
        seqs = [pool.add(p, w, s, mix=mix, tag=b, share=True)
                for b, (p, w, s) in enumerate(zip(prompts, weights, specs))]
        made: list[list[int]] = [[] for _ in range(B)]
        sync = 1 if stream or any(s.stopping is not None for s in specs) else self.steps_per_sync
        waiting: list[Seq] = []
        while True:
            while any(not s.done for s in pool.live()):
                for events in pool.step(sync, release=False):
                    tokens, reasons = [None] * B, [None] * B
                    for seq, tok, reason in events:
                        b = seq.tag
                        tokens[b] = tok
                        made[b].append(tok)
                        if reason == "deferred":
                            waiting.append(seq)
                        else:
                            reasons[b] = reason
                    yield tokens, reasons, seqs
            if not waiting:
                return
            for seq in pool.live():          # all finished: their slots go to the ones waiting
                pool._release(seq)
            later = []
            for old in waiting:              # on, from the tokens so far (Slots._part: the pool was full)
                b = old.tag
                try:
                    new = pool.add(prompts[b] + made[b], weights[b], specs[b], tag=b, share=True,
                                   budget=specs[b].max_new_tokens - len(made[b]))
                except PoolFull:
                    later.append(old)
                    continue
                new.scores, new.logits = old.scores, old.logits
                seqs[b] = new
            waiting = later

    def _decode_mixed_peft(self, prompts, weights, specs, stream):
        names = mix_in_layers(self.model, weights, self.names)
        saved = self.names
        self._restack()
        self.names = saved + names
        try:
            w = torch.zeros(len(prompts), len(self.names))
            w[:, len(saved):] = torch.eye(len(prompts))
            yield from self._steps(prompts, w, specs, False, stream)
        finally:
            self.names = saved
            self._restack()
            self.model.set_adapter(saved[0])
            for n in names:
                self.model.delete_adapter(n)

    def generate(self, prompts: list[list[int]], weights: torch.Tensor, decoding: Decoding | list | None = None,
                 *, max_new_tokens: int = 64, eos_id: int | None = None, on_token=None, mix: bool = False
                 ) -> list[list[int]]:
        """New token ids for each prompt (the EOS id that ended a row removed). weights [B, K];
        `decoding` (one, or one per prompt), else greedy for `max_new_tokens` stopping at
        `eos_id`. on_token(b, id) is called as each token comes (and makes the engine sync
        every step)."""
        if decoding is None:
            decoding = sampling(max_new_tokens=max_new_tokens, eos_ids=[] if eos_id is None else [eos_id])
        return [d.text_ids for d in self.decode(prompts, weights, decoding, on_token=on_token, mix=mix)]

    def decode(self, prompts: list[list[int]], weights: torch.Tensor, decoding: Decoding | list, *,
               on_token=None, mix: bool = False) -> list[Decoded]:
        """Decode a batch to its end, as transformers' generate reports it (Decoded: every id,
        the EOS included; the scores and logits its Decoding asks for). weights [B, K]; decoding:
        one, or one per prompt; on_token(b, id) as for `generate`."""
        specs = decoding if isinstance(decoding, list) else [decoding] * len(prompts)
        out = [Decoded([], None, [], [], spec) for spec in specs]
        for tokens, reasons, seqs in self._steps(prompts, weights, decoding, mix, on_token is not None):
            for b, tok in enumerate(tokens):
                if tok is not None:
                    out[b].ids.append(tok)
                    if on_token is not None and is_text(tok, reasons[b], specs[b]):
                        on_token(b, tok)
                out[b].reason = reasons[b] or out[b].reason
        for d, seq in zip(out, seqs):
            d.scores, d.logits = seq.scores, seq.logits
        return out

    def decoded_token_ms(self, prompts: list[list[int]], name: str = "base") -> float:
        """Milliseconds of one decoded token at batch 1 with adapter `name`, EOS ignored:
        (t(17 tokens) - t(1 token)) / 16 per prompt, after a warm-up."""
        w1 = self.one_hot(name, 1)

        def timed(n_tokens):
            t = time.perf_counter()
            for p in prompts:
                self.generate([p], w1, max_new_tokens=n_tokens)
            return (time.perf_counter() - t) / len(prompts)

        timed(2)
        return 1000 * (timed(17) - timed(1)) / 16

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, prompt: list[int], continuations: list[list[int]], weights: torch.Tensor,
              greedy: bool = False) -> list:
        """Sum over continuation tokens of log softmax(sum_c w_c logits_c): one value per continuation
        (with greedy=True, (value, whether every token is the mixed logits' argmax)).

        weights: [K] for this prompt. One forward for all (adapter, continuation) rows
        (`score_batch` with the prompt as every request's context).
        """
        w = self.weights(weights, 1)
        if not continuations:
            return []
        return self.score_batch([(prompt, c) for c in continuations], w.expand(len(continuations), -1), greedy)

    def score_many(self, requests: list[tuple[list[int], list[int]]], weights: torch.Tensor, greedy: bool = False,
                   batch_size: int | None = None, max_batch_size: int | None = None, on_batch=None) -> list:
        """`score_batch` for any number of (context, continuation) token pairs, in request order.

        weights [n, K], row i for request i. Requests go longest first (padding stays short) in
        batches of `batch_size` requests; batch_size None sizes each batch by memory instead
        (`score_budget`: as many requests as the budget holds, at most `max_batch_size`).
        on_batch(n_requests) is called after each batch (progress bars).
        """
        weights = self.weights(weights, len(requests))
        n_rows = (weights > 0).sum(1).tolist()                                  # forward rows per request
        # longest first; requests that share an input (all but the continuation's last token) side by side
        order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])),
                                                            requests[i][0] + requests[i][1][:-1]))
        budget, out, s = self.score_budget(), [None] * len(requests), 0
        while s < len(order):
            e = s + 1
            if batch_size:
                e = min(s + batch_size, len(order))
            else:  # the first request is the longest: it sets the padded length T of the batch
                T, L = len(requests[order[s]][0]) + len(requests[order[s]][1]), 1
                rows = n_rows[order[s]]
                while e < len(order) and (max_batch_size is None or e - s < max_batch_size):
                    L2 = max(L, len(requests[order[e]][1]))
                    if self._score_bytes(rows + n_rows[order[e]], T, L2) > budget:
                        break
                    rows, L, e = rows + n_rows[order[e]], L2, e + 1
            idx = order[s:e]
            for i, r in zip(idx, self.score_batch([requests[i] for i in idx], weights[idx], greedy)):
                out[i] = r
            if on_batch is not None:
                on_batch(len(idx))
            s = e
        return out

    def score_budget(self) -> int:
        """Bytes a scoring forward may take when batches are sized automatically: half the free
        memory of a CUDA device, 512 MiB on a CPU (where larger batches barely pay)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] // 2
        return 512 * 2 ** 20

    def _score_bytes(self, rows: int, T: int, L: int) -> int:
        """An estimate of a scoring forward's peak memory: per token the widest transient
        activations of one layer (MLP: 3 x intermediate, attention: ~6 x hidden), per kept
        position three float32 copies of the vocabulary's logits (logits, mixed, log-softmax)."""
        cfg = getattr(self.model, "config", None)
        hidden = getattr(cfg, "hidden_size", 4096)
        inter = getattr(cfg, "intermediate_size", 4 * hidden)
        vocab = getattr(cfg, "vocab_size", 32000)
        per_token = (3 * inter + 6 * hidden) * torch.finfo(self.dtype).bits // 8
        return rows * (T * per_token + (L + 1) * vocab * 4 * 3)

    @torch.no_grad()
    def score_batch(self, requests: list[tuple[list[int], list[int]]], weights: torch.Tensor,
                    greedy: bool = False) -> list:
        """`score` for requests with different contexts, in one forward: for request i = (x, y),
        sum_t log softmax(sum_c w_ic logits_c(x, y_<t))[y_t] (with greedy=True, (value, whether
        every y_t is the mixed logits' argmax)).

        weights [n, K]. One left-padded row per (distinct input, adapter with w_ic > 0), each
        row's LoRA chosen by the stacked selector (or PEFT's adapter_names); only the last L + 1
        positions (L: the longest continuation) come out of the model. Requests that differ
        only in their continuation's last token (multiple choice with one-token answers) share
        their rows: that token is never an input, so their logits are the same (as lm-eval's
        `hf` backend reuses them).
        """
        device = self.device
        weights = self.weights(weights, len(requests))
        inputs: dict[tuple, int] = {}   # (x + y[:-1], |y|, weights) -> its index u
        of = [inputs.setdefault((tuple(x + y[:-1]), len(y), tuple(weights[i].tolist())), len(inputs))
              for i, (x, y) in enumerate(requests)]
        first = {u: i for i, u in reversed(list(enumerate(of)))}    # u -> a request with that input
        rows = [(u, c) for u in range(len(inputs)) for c in range(len(self.names)) if weights[first[u], c] > 0]
        seqs = [requests[first[u]][0] + requests[first[u]][1] for u, _ in rows]
        ids, mask = left_pad(seqs, self.pad_id, device)                       # (R, T)
        L = max(len(y) for _, y in requests)
        with self._rows([c for _, c in rows]) as kw:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             use_cache=False, logits_to_keep=L + 1, **kw)
        logits = out.logits[:, -(L + 1):-1].float()                           # (R, L, V): predict the last L
        row_w = torch.tensor([float(weights[first[u], c]) for u, c in rows], device=device)
        owner = torch.tensor([u for u, _ in rows], device=device)
        combined = torch.zeros(len(inputs), L, logits.shape[-1], device=device)
        combined.index_add_(0, owner, logits * row_w[:, None, None])          # (U, L, V)
        logp = torch.log_softmax(combined, dim=-1)[torch.tensor(of, device=device)]   # (n, L, V)
        # continuations right-aligned in L columns, as their logits are: token t of y at L-|y|+t
        target, valid = left_pad([y for _, y in requests] + [[0] * L], 0, device)
        target, valid = target[:-1], valid[:-1].bool()                         # (n, L)
        picked = logp.gather(2, target[..., None])[..., 0]
        values = torch.where(valid, picked, 0.0).sum(1)
        hits = ((logp.argmax(-1) == target) | ~valid).all(1)
        values, hits = values.tolist(), hits.tolist()                          # one host sync
        return [(v, h) for v, h in zip(values, hits)] if greedy else values

    @contextlib.contextmanager
    def _rows(self, adapters: list[int], mix: torch.Tensor | None = None):
        """Forward kwargs under which row i runs adapter names[adapters[i]] (a stacked selector, or
        PEFT's adapter_names)."""
        if self.stack is None:
            yield {"adapter_names": [self.names[a] for a in adapters]}
            return
        sel = self.stack.select(torch.tensor(adapters, device=self.device))
        with self.stack.rows(sel):
            yield {}


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in transformers >= 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class Slots:
    """S slots x L columns of KV cache, and the requests decoding in them (see the module docstring).

    Row-indexed device state (S,): the token each row reads next, its position, its write
    column, its first valid column, the request it reads its next token from (`owner`), its LoRA
    selector. Request-indexed state (Q + 1,; index Q is the placeholder that free rows point
    to): finished, tokens so far, token budget, EOS ids, and the history (prompt, then new
    tokens) that processors and stop strings read. Which requests mix which rows, with what
    weight, are the links (row, request, weight).

    Shared rows (`add(..., share=True)`): a row is a (prompt, adapter, tokens so far) state,
    whatever weight the requests give it. Requests that join in the same prefill with the same
    prompt share the row of each adapter they both weigh: one prefill and one decode row
    serve them all, each mixing it with its own weight. When their choices part (their weights
    or processors pick different tokens), the row forks at that step: the requests that chose
    differently get a copy of its cache on a free slot (the pool grows when none is free) and
    go on alone. Every request's tokens are what it would decode alone; the work is that of the
    distinct continuations. `elrea compare` and `elrea eval` decode several routings of the
    same prompts this way (docs/method.md, "Decoding several routings at once").
    """

    def __init__(self, engine: Ensemble, n: int, length: int, requests: int | None = None):
        self.engine, self.n, self.length = engine, n, length
        self.nq = Q = max(n, requests or 0)
        dev, S = engine.device, n
        self.cache = SlotCache(S, length)
        self._kw = _cache_kwarg(engine.model)
        z = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, device=dev)  # noqa: E731
        self.tok, self.pos = z(S, 1), z(S, 1)
        self.cols, self.starts, self.owner = z(S), z(S), z(S)
        stack = engine.stack
        self.selector = (z(S, len(engine.names) * stack.rank, dtype=stack.dtype) if stack is not None else None)
        self.adapter_names = [engine.names[0]] * S                      # the fallback's per-row names
        self.done = torch.ones(Q + 1, dtype=torch.bool, device=dev)
        self.n_new, self.max_new = z(Q + 1), z(Q + 1)
        self.eos = torch.full((Q + 1, 4), -1, dtype=torch.long, device=dev)
        self.history = torch.full((Q + 1, length), engine.pad_id, dtype=torch.long, device=dev)
        self.hcol = z(Q + 1)
        self._arange = torch.arange(length, device=dev)
        self._mark_static()
        self._step_fn = None
        self._shapes: set = set()
        self.grow_to = 2 * n                 # the most slots forks may grow the pool to (then: deferral)
        self.reset()

    def _mark_static(self) -> None:
        for t in (self.tok, self.pos, self.cols, self.starts, self.selector):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.free_rows, self.free_q = list(range(self.n)), list(range(self.nq))
        self.seqs: dict[int, Seq] = {}
        self.pending: list[Seq] = []
        self.links: dict[int, dict[int, float]] = {}     # row -> {request: weight}, in joining order
        self._link_t = None                              # (rows, requests, weights) on the device
        self._shared: set[int] = set()                   # rows that more than one request reads
        self._joining: dict[tuple, dict[int, int]] = {}  # prompt -> {adapter: row}, until the prefill
        self.owner.fill_(self.nq)
        self.cols.zero_()
        self.starts.zero_()
        self.done.fill_(True)

    # ------------------------------------------------------------------ joining and leaving

    def rows_needed(self, weights: torch.Tensor, mix: bool = False) -> int:
        return 1 if mix else int((weights > 0).sum())

    def live(self) -> list[Seq]:
        return list(self.seqs.values())

    def add(self, prompt: list[int], weights: torch.Tensor, decoding: Decoding, mix: bool = False,
            tag=None, share: bool = False, budget: int | None = None) -> Seq:
        """Queue a request for the next step's prefill; PoolFull when its slots are not free now.
        share=True: it shares rows with the requests of the same prompt that join in the same
        prefill (see the class docstring); the pool then grows when a fork finds no free slot.
        budget: the new tokens it may make, when not its Decoding's max_new_tokens."""
        weights = self.engine.weights(weights, 1).reshape(-1)
        need = self.rows_needed(weights, mix)
        if need == 0:
            raise ValueError("weights: every weight is 0")
        budget = decoding.max_new_tokens if budget is None else budget
        if len(prompt) + budget > self.length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {budget} new tokens does not "
                             f"fit the engine's {self.length} columns")
        kept = [0] if mix else [c for c in range(len(weights)) if weights[c] > 0]
        joined = self._joining.setdefault(tuple(prompt), {}) if share and not mix else {}
        fresh = [c for c in kept if c not in joined]
        if len(fresh) > len(self.free_rows) or not self.free_q:
            raise PoolFull(f"{len(fresh)} slots needed, {len(self.free_rows)} free")
        if len(decoding.eos_ids) > self.eos.shape[1]:
            self.eos = torch.cat([self.eos, torch.full((self.nq + 1, len(decoding.eos_ids)), -1,
                                                       dtype=torch.long, device=self.eos.device)], 1)
        rows = []
        for c in kept:
            if c not in joined:
                joined[c] = self.free_rows.pop(0)        # the lowest free: the busy prefix stays short
                self.links[joined[c]] = {}
            rows.append(joined[c])
        seq = Seq(self.free_q.pop(0), rows, list(prompt), decoding, weights, mix, tag, budget=budget)
        for row, c in zip(rows, kept):
            self._link(row, seq.q, 1.0 if mix else float(weights[c]))
        self.seqs[seq.q] = seq
        self.pending.append(seq)
        return seq

    def cancel(self, seq: Seq) -> None:
        seq.decoding.cancelled = True

    def _link(self, row: int, q: int, w: float) -> None:
        self.links[row][q] = w
        if len(self.links[row]) > 1:
            self._shared.add(row)
        self._link_t = None

    def _link_tensors(self):
        """(rows, requests, weights) of every link on the device, rows ascending: what mixing reads."""
        if self._link_t is None:
            flat = [(r, q, w) for r in sorted(self.links) for q, w in self.links[r].items()]
            dev = self.owner.device
            self._link_t = (torch.tensor([f[0] for f in flat], dtype=torch.long, device=dev),
                            torch.tensor([f[1] for f in flat], dtype=torch.long, device=dev),
                            torch.tensor([f[2] for f in flat], dtype=torch.float32, device=dev))
        return self._link_t

    def _mix(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(Q + 1, V): each request's weighted sum of its rows' logits. logits: (S', V) of rows
        0..S'-1, or of `rows` (a prefill's)."""
        lrow, lq, lw = self._link_tensors()
        mixed = torch.zeros(self.nq + 1, logits.shape[1], device=logits.device)
        if rows is not None:                 # a prefill: its rows only, at their place in `logits`
            where = torch.full((self.n,), -1, dtype=torch.long, device=logits.device)
            where[rows] = torch.arange(len(rows), device=logits.device)
            at = where[lrow]
            keep = at >= 0
            lrow, lq, lw = at[keep], lq[keep], lw[keep]
        else:
            keep = lrow < logits.shape[0]
            lrow, lq, lw = lrow[keep], lq[keep], lw[keep]
        mixed.index_add_(0, lq, logits[lrow].float() * lw[:, None])
        return mixed

    def _release(self, seq: Seq, done: list | None = None) -> None:
        self.seqs.pop(seq.q, None)
        self._unlink(seq, done)
        self.free_q.append(seq.q)

    def _drop_rows(self, seq: Seq) -> None:
        """A finished request stops reading its rows (it stays, for its group's draws)."""
        self._unlink(seq)
        seq.rows = []

    def _unlink(self, seq: Seq, done: list | None = None) -> None:
        """Take a request off its rows; those no other request reads are freed, the others read
        a request still going (`done`: the device's finished flags, where the host's lag)."""
        freed = []
        for row in set(seq.rows):
            links = self.links.get(row, {})
            links.pop(seq.q, None)
            if links:
                self._retarget(row, done)
            else:
                self.links.pop(row, None)
                self._shared.discard(row)
                freed.append(row)
        self._free(freed)
        self._link_t = None

    def _free(self, rows: list[int]) -> None:
        if rows:
            t = torch.tensor(rows, device=self.owner.device)
            self.owner[t] = self.nq
            self.cols[t] = 0
            self.starts[t] = 0
            self.free_rows = sorted(self.free_rows + rows)

    def _compact(self) -> None:
        """At a host sync, when at most half the busy prefix of slots is read by a request, move the
        top rows into the free slots below (their cache and state copied): a decode step covers
        the busy prefix, so finished requests below running ones would otherwise cost a row each."""
        used = sorted(r for r, links in self.links.items() if links)
        if not used or len(used) > (used[-1] + 1) // 2:
            return
        low = [r for r in self.free_rows if r < used[-1]]
        moves = []
        while low and used and low[0] < used[-1]:
            moves.append((used.pop(), low.pop(0)))
        src = torch.tensor([m[0] for m in moves], device=self.owner.device)
        dst = torch.tensor([m[1] for m in moves], device=self.owner.device)
        self._copy_rows(src, dst)
        self.owner[dst] = self.owner[src]
        for a, b in moves:
            self.links[b] = self.links.pop(a)
            for q in self.links[b]:
                self.seqs[q].rows = [b if r == a else r for r in self.seqs[q].rows]
            if a in self._shared:
                self._shared.discard(a)
                self._shared.add(b)
        taken = {b for _, b in moves}
        self.free_rows = [r for r in self.free_rows if r not in taken]
        self._free(src.tolist())
        self.engine.stats.moves += len(moves)
        self._link_t = None

    def _retarget(self, row: int, done: list | None = None) -> None:
        """Point a row at a request of its own that is still going (the one whose token it reads);
        `done`: the device's finished flags, where the host's may lag."""
        live = [q for q in self.links[row] if q in self.seqs and not (done[q] if done else self.seqs[q].done)]
        if len(live) < 2:
            self._shared.discard(row)
        if live:
            self.owner[row] = live[0]

    # ------------------------------------------------------------------ forks

    def _part(self, nxt: torch.Tensor, why: torch.Tensor) -> None:
        """After a step chose every request's token (nxt, (Q + 1,)): give the requests that share
        a row but chose differently rows of their own (copies of it), so that every row reads one
        token. One host sync, and only while some row is shared. Where the pool may not grow
        further (`grow_to`), the requests that would fork are deferred instead (why 3): they
        leave the pool now, and the caller adds each back later with its tokens so far as its
        prompt (`_steps`)."""
        if not self._shared:
            return
        toks, done = nxt.tolist(), self.done.tolist()
        for row in sorted(self._shared):
            if row not in self._shared:          # left by a deferral earlier in this loop
                continue
            live = [q for q in self.links[row] if not done[q]]
            groups: dict[int, list[int]] = {}
            for q in live:
                groups.setdefault(toks[q], []).append(q)
            parts = list(groups.values())
            if parts:
                self.owner[row] = parts[0][0]
            for part in parts[1:]:
                if self.free_rows or self.n < self.grow_to:
                    self._fork(row, part)
                    continue
                for q in part:                   # no room: these go on later, from their tokens so far
                    seq = self.seqs[q]
                    self._release(seq, done)
                    seq.deferred = True
                    done[q] = True
                    self.done[q] = True
                    why[q] = 3
            if not parts or len(parts[0]) < 2:
                self._shared.discard(row)

    def _fork(self, row: int, qs: list[int]) -> None:
        """Move requests `qs` off `row` onto a copy of it."""
        if not self.free_rows:
            self._grow()
        new = self.free_rows.pop(0)
        self._copy_rows(torch.tensor([row]), torch.tensor([new]))
        self.owner[new] = qs[0]
        self.links[new] = {}
        for q in qs:
            self._link(new, q, self.links[row].pop(q))
            seq = self.seqs[q]
            seq.rows = [new if r == row else r for r in seq.rows]
        if len(qs) < 2:
            self._shared.discard(new)
        self.engine.stats.forks += 1
        self._link_t = None

    def _copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Rows `dst` take the cache and state of rows `src` (a fork's copy, a compaction's move)."""
        src, dst = src.to(self.owner.device), dst.to(self.owner.device)
        for k, v in zip(self.cache.keys, self.cache.values):
            k[dst] = k[src]
            v[dst] = v[src]
        for t in (self.tok, self.pos, self.cols, self.starts, self.selector):
            if t is not None:
                t[dst] = t[src]
        for a, b in zip(src.tolist(), dst.tolist()):
            self.adapter_names[b] = self.adapter_names[a]

    def _grow(self) -> None:
        """Twice the slots (a fork found none free): every row tensor and the cache copied over.
        The decode step's compiled graphs, if any, are rebuilt for the new tensors."""
        S, dev = self.n, self.engine.device
        n = 2 * S

        def bigger(t, fill=0):
            out = torch.full((n, *t.shape[1:]), fill, dtype=t.dtype, device=dev)
            out[:S] = t
            return out

        self.tok, self.pos, self.cols, self.starts = (bigger(t) for t in (self.tok, self.pos, self.cols, self.starts))
        self.owner = bigger(self.owner, self.nq)
        if self.selector is not None:
            self.selector = bigger(self.selector)
        self.adapter_names += [self.engine.names[0]] * S
        self.cache.grow(n)
        self.free_rows = sorted(self.free_rows + list(range(S, n)))
        self.n = n
        self._mark_static()
        self._step_fn, self._shapes = None, set()

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def step(self, max_steps: int = 1, release: bool = True) -> list[list[tuple[Seq, int | None, str | None]]]:
        """Prefill what joined (that counts as a step), then decode steps up to max_steps, then one
        host sync. Returns, per step, (request, token, reason) for every request still going at
        that step. release=False keeps finished requests' slots (and their rows in processor
        batches) until `reset`: a static batch, as one `decode_steps` call decodes."""
        steps: list = []
        for seq in [s for s in self.seqs.values() if s.decoding.cancelled and not s.done]:
            seq.done, seq.reason = True, "cancelled"
            self.done[seq.q] = True
            steps.append([(seq, None, "cancelled")])
        recorded = []                                     # (requests, [tokens, why], kept scores) per step
        if self.pending:
            new, self.pending = self.pending, []
            recorded.append((new, *self._prefill(new)))
        live = list(self.seqs.values())
        if any(not s.done for s in live):
            # a prefill counts as the step of the requests it starts; requests already running
            # decode in the same call, so that a newcomer never pauses them
            running = any(not s.done and all(s is not n for n in recorded[0][0]) for s in live) if recorded else True
            for _ in range(max_steps - (0 if running else len(recorded))):
                recorded.append((live, *self._decode(live)))
        if recorded:
            flat = torch.stack([torch.stack(r[1]) for r in recorded]).tolist()   # the host sync: (n, 2, S + 1)
            for (seqs, _, kept), (toks, whys) in zip(recorded, flat):
                events = []
                for seq in seqs:
                    if seq.done:
                        continue
                    tok, why = toks[seq.q], whys[seq.q]
                    seq.tokens += 1
                    _keep(seq, kept)
                    if why:
                        seq.done, seq.reason = True, {1: "stop", 2: "length", 3: "deferred"}[why]
                    events.append((seq, tok, seq.reason if why else None))
                steps.append(events)
        if release:
            for seq in [s for s in self.seqs.values() if s.done]:
                self._release(seq)
        else:       # a static batch keeps its finished requests (their draws), not their rows
            for seq in [s for s in self.seqs.values() if s.done and s.rows]:
                self._drop_rows(seq)
        self._compact()
        return steps

    def _prefill(self, new: list[Seq]):
        """One forward for every row of the requests that joined: their prompts, left-padded to T,
        written to their slots' columns [0, T); then their first token."""
        eng, dev = self.engine, self.engine.device
        rows, prompts, adapters, mixes, owners = [], [], [], [], []
        for seq in new:
            kept = [0] if seq.mix else [c for c in range(len(eng.names)) if seq.weights[c] > 0]
            for r, c in zip(seq.rows, kept):
                if r in rows:                     # a row shared with a request before it
                    continue
                rows.append(r)
                prompts.append(seq.prompt)
                adapters.append(c)
                mixes.append(seq.weights if seq.mix else None)
                owners.append(seq.q)
        self._joining = {}
        ids, mask = left_pad(prompts, eng.pad_id, dev)                         # (n, T)
        T = ids.shape[1]
        rows_t = torch.tensor(rows, device=dev)
        lens = mask.sum(1)
        self.starts[rows_t] = T - lens
        self.cols[rows_t] = T
        self.pos[rows_t, 0] = lens
        self.owner[rows_t] = torch.tensor(owners, device=dev)
        if self.selector is not None:
            sel = eng.stack.select(torch.tensor(adapters, device=dev))                  # (n, K r)
            for i, w in enumerate(mixes):
                if w is not None:
                    sel[i] = eng.stack.mix(w[None].to(dev))[0]
            self.selector[rows_t] = sel
            kw = {}
        else:
            sel, kw = None, {"adapter_names": [eng.names[a] for a in adapters]}
            for r, a in zip(rows, adapters):
                self.adapter_names[r] = eng.names[a]
        keep = mask.bool()[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
        dtype = eng.dtype
        attn = torch.zeros(keep.shape, dtype=dtype, device=dev).masked_fill(~keep, torch.finfo(dtype).min)
        with (eng.stack.rows(sel) if sel is not None else contextlib.nullcontext()):
            out = eng.model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(mask),
                            use_cache=True, logits_to_keep=1, **{self._kw: self.cache.prefill(rows_t)}, **kw)
        logits = out.logits[:, -1].float()                                     # (n, V)
        qs = torch.tensor([seq.q for seq in new], device=dev)
        for seq in new:
            self.history[seq.q].fill_(eng.pad_id)
            p = torch.tensor(seq.prompt, dtype=torch.long, device=dev)
            self.history[seq.q, T - len(seq.prompt):T] = p
            seq.hcol = seq.col = T
            self.eos[seq.q].fill_(-1)
            if seq.decoding.eos_ids:
                self.eos[seq.q, :len(seq.decoding.eos_ids)] = torch.tensor(sorted(seq.decoding.eos_ids), device=dev)
        self.hcol[qs] = T
        self.n_new[qs] = 0
        self.max_new[qs] = torch.tensor([seq.budget for seq in new], device=dev)
        self.done[qs] = False
        eng.stats.prefills += 1
        eng.stats.prefill_rows += len(rows)
        mixed = self._mix(logits, rows_t)
        which = torch.zeros(self.nq + 1, dtype=torch.bool, device=dev)
        which[qs] = True
        nxt, why, kept = self._advance(mixed, which, new)
        self._part(nxt, why)
        rows_t = torch.tensor(sorted({r for seq in new for r in seq.rows}), device=dev)
        self.tok[rows_t] = nxt[self.owner[rows_t]][:, None]
        return [nxt, why], kept

    def _decode(self, live: list[Seq]):
        """One step for every slot: the compiled forward, mixing, choice, stop conditions."""
        eng = self.engine
        logits = self._forward()                                                # (S', V), S' <= S
        mixed = self._mix(logits)
        which = torch.zeros(self.nq + 1, dtype=torch.bool, device=logits.device)
        which[torch.tensor([s.q for s in live], device=logits.device, dtype=torch.long)] = True
        busy = (self.owner < self.nq).long()                  # free slots stay at column 0
        self.pos.add_(busy[:, None])
        self.cols.add_(busy).clamp_(max=self.length - 1)
        for seq in self.seqs.values():
            seq.col = min(seq.col + 1, self.length - 1)
        eng.stats.steps += 1
        nxt, why, kept = self._advance(mixed, which, live)
        self._part(nxt, why)
        self.tok.copy_(nxt[self.owner][:, None])
        return [nxt, why], kept

    def _advance(self, mixed: torch.Tensor, which: torch.Tensor, seqs: list[Seq]):
        """Choose the next token of every request in `which` from its mixed logits (S + 1, V), write it
        to its history, update finished flags; the rows read it next. Returns (tokens, why, kept) on
        the device: why 1 = stopped (EOS or stop string), 2 = length, 0 = going on; kept: (scores
        after the processors, raw mixed logits), each (S + 1, V), when a request asks (else None)."""
        pad = self.engine.pad_id
        nxt, scores = self._choose(mixed, seqs)                                 # (S + 1,)
        active = which & ~self.done
        nxt = torch.where(active, nxt, torch.full_like(nxt, pad))
        self.history.scatter_(1, self.hcol[:, None].clamp(max=self.length - 1), nxt[:, None])
        self.hcol.add_(which.long())
        for seq in seqs:
            seq.hcol += 1
        stop = (nxt[:, None] == self.eos).any(1)
        for spec, qs, h in _groups(seqs, nxt.device):
            if spec.stopping is not None:
                hit = spec.stopping(self.history[qs, :h], None)
                stop[qs] |= torch.as_tensor(hit, device=stop.device).reshape(-1)
        self.n_new.add_(active.long())
        finished = active & (stop | (self.n_new >= self.max_new))
        why = torch.where(finished, torch.where(stop, 1, 2), 0)
        self.done |= finished
        kept = (scores, mixed) if any(s.decoding.output_scores or s.decoding.output_logits for s in seqs) else None
        return nxt, why, kept

    def _choose(self, mixed: torch.Tensor, seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token per request: argmax for plain greedy requests (all at once); each group of
        requests that share a Decoding through its processors, then argmax or a draw. Also the
        scores the choice was made from (S + 1, V), where a request asks for them (else None)."""
        nxt = mixed.argmax(-1)
        scores = mixed.clone() if any(s.decoding.output_scores for s in seqs) else None
        for spec, qs, h in _groups(seqs, mixed.device):
            if not spec.processors and not spec.do_sample:
                continue
            logits = mixed[qs]
            if spec.processors:
                logits = spec.processors(self.history[qs, :h], logits)
                if scores is not None:
                    scores[qs] = logits
            if spec.do_sample:
                pick = torch.multinomial(torch.softmax(logits, -1), 1, generator=spec.generator).squeeze(1)
            else:
                pick = logits.argmax(-1)
            nxt[qs] = pick
        return nxt, scores

    # ------------------------------------------------------------------ the forward

    def _step(self, tok, pos, cols, starts, selector, arange):
        """One decode forward for all S rows: (S, V) logits. Everything here has fixed shapes."""
        eng = self.engine
        keep = (arange[None, :] >= starts[:, None]) & (arange[None, :] <= cols[:, None])     # (S, L)
        dtype = eng.dtype
        mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        kw = {} if selector is not None else {"adapter_names": self.adapter_names[:tok.shape[0]]}
        out = eng.model(input_ids=tok, attention_mask=mask[:, None, None, :], position_ids=pos, use_cache=True,
                        logits_to_keep=1, **{self._kw: self.cache}, **kw)
        return out.logits[:, -1]

    def _busy(self, compiled: bool | None = None) -> tuple[int, int]:
        """(slots, columns) the decode step must cover: the prefix of slots up to the last one in use
        and the columns up to the furthest write. A compiled step rounds each up to a power of two
        (the shapes that compile, so recompiles stay bounded); an eager one (compile "off", the
        CPU's default) takes them as they are: padding rows and columns would be work for nothing."""
        seqs = self.seqs.values()
        hi = max((r for s in seqs for r in s.rows), default=0) + 1
        span = max((s.col for s in seqs), default=0) + 1
        if compiled is None:
            compiled = self._step_fn != self._step and self.engine.compile != "off"
        if not compiled:
            return min(hi, self.n), min(span, self.length)
        return min(bucket(hi), self.n), min(bucket(span, 64), self.length)

    def _forward(self) -> torch.Tensor:
        """Logits (S', V) of the decode step for the busy prefix of S' slots (the rows past it are free)."""
        eng = self.engine
        hi, span = self._busy()
        eng.stats.decode_rows += hi
        self.cache.decode(self.cols[:hi], span)
        sel = self.selector[:hi] if self.selector is not None else None
        ctx = eng.stack.rows(sel) if sel is not None else contextlib.nullcontext()
        args = (self.tok[:hi], self.pos[:hi], self.cols[:hi], self.starts[:hi], sel, self._arange[:span])
        return self._run_step(ctx, args, (hi, span))

    def _run_step(self, ctx, args, shape) -> torch.Tensor:
        eng = self.engine
        with ctx:
            if self._step_fn is None:
                self._step_fn = self._compiled()
            if self._step_fn != self._step:
                if shape not in self._shapes:          # a new bucket: this call compiles it
                    self._shapes.add(shape)
                    eng.stats.compiled.append(shape)
                try:
                    return self._step_fn(*args).clone()
                except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly, say so once
                    self._step_fn = self._step
                    eng.stats.fallback = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                    if not eng._warned:
                        eng._warned = True
                        log.warning("torch.compile of the decode step failed (%s); decoding eagerly",
                                    eng.stats.fallback)
            return self._step(*args)

    def _compiled(self):
        eng = self.engine
        mode = eng.compile
        if mode == "off":
            return self._step
        if self.selector is None:
            if not eng._warned:
                eng._warned = True
                log.warning("decoding eagerly: these adapters run through PEFT's mixed batches, which do not compile")
            eng.stats.fallback = "PEFT mixed-adapter batches"
            return self._step
        # one graph per (slots, columns) bucket: raise dynamo's recompile limit to their number
        buckets = (self.n.bit_length()) * (self.length.bit_length() - 5)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), buckets + 1))
        if mode == "dynamo":
            return torch.compile(self._step, backend="eager", dynamic=False)
        return torch.compile(self._step, mode=mode, dynamic=False)


def _keep(seq: Seq, kept) -> None:
    """Add this step's scores and logits of request `seq` to it, where its Decoding asks: kept is
    (scores, logits), each (S + 1, V) on the device, or None. A copy of the row, so that the
    step's whole tensors are not held."""
    if kept is not None and seq.decoding.output_scores:
        seq.scores.append(kept[0][seq.q].clone())
    if kept is not None and seq.decoding.output_logits:
        seq.logits.append(kept[1][seq.q].clone())


def _groups(seqs: list[Seq], device):
    """(Decoding, request indices as a tensor, history columns) of the requests that share a
    Decoding object and history length: what processors and stop strings see together."""
    groups: dict[tuple, list[int]] = {}
    specs = {}
    for s in seqs:
        key = (id(s.decoding), s.hcol)
        groups.setdefault(key, []).append(s.q)
        specs[key] = s.decoding
    for key, qs in groups.items():
        yield specs[key], torch.tensor(qs, dtype=torch.long, device=device), key[1]


def _contiguous_input(module, args):
    """A forward pre-hook for the output layer: its input made contiguous.

    A prefill or a scoring call keeps the logits of the last positions only, and transformers
    gives the LM head `hidden[:, -k:, :]`, a strided view. torch's linear cannot fold that
    view's batch dimensions into one matmul, so it expands the whole (vocab x hidden) weight
    once per row and multiplies batch by batch: on a CPU, 9x slower than on a contiguous copy in
    float32 and some 500x in bfloat16, where it was a third of a prefill (docs/benchmarks.md,
    "The engine's prefill"). The copy is a few rows of hidden states."""
    x = args[0] if args else None
    if x is None or not isinstance(x, torch.Tensor) or x.is_contiguous():
        return None
    return (x.contiguous(), *args[1:])


def _model_dtype(model) -> torch.dtype:
    """The dtype of the backbone's activations (its first floating parameter's)."""
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32
