"""Gradient features: batched per-example LoRA gradients, preconditioned and projected.

For a LoRA layer y = W0 x + s * B A x, PEFT runs A and B as two bias-free nn.Linear modules.
For any bias-free linear module with per-token input u_t and output gradient e_t, the gradient
of example i's loss with respect to its weight is

    dW_i = sum_t e_{i,t} u_{i,t}^T                                   (docs/method.md, eq. 2)

so for A (u = dropout(x), e = s * B^T g) and B (u = A x, e = s * g) one backward pass over the
batch gives every example's exact gradient: forward hooks keep each LoRA module's input and
output, `torch.autograd.grad` returns d(sum of per-example losses)/d(output), and since
examples do not interact, row i of that output gradient belongs to example i alone.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from .models import PeakMemory, free_memory, lora_parameters, model_device
from .registry import PRECONDITIONERS  # re-exported: the preconditioners by name

log = logging.getLogger(__name__)


@dataclass
class _Capture:
    name: str          # parameter name (model.named_parameters order)
    module: torch.nn.Linear
    inputs: torch.Tensor | None = None   # (n, T, in)
    output: torch.Tensor | None = None   # (n, T, out), part of the graph


def _lora_captures(model, adapter: str | None = None) -> list[_Capture]:
    """The LoRA factors to differentiate: the trainable ones, or those of one named adapter."""
    if adapter is None:
        params = lora_parameters(model)
    else:
        params = [(n, p) for n, p in model.named_parameters()
                  if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]
    if not params:
        raise ValueError("no LoRA parameters to differentiate; expected a PEFT LoRA model"
                         + (f" with adapter {adapter!r}" if adapter else " with trainable LoRA weights"))
    owners = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners[id(p)] = (mod, p_name)
    caps = []
    for name, p in params:
        mod, p_name = owners[id(p)]
        if not isinstance(mod, torch.nn.Linear) or p_name != "weight" or mod.bias is not None:
            raise NotImplementedError(
                f"per-example gradients support bias-free linear LoRA factors; {name} belongs to "
                f"{type(mod).__name__}.{p_name}")
        caps.append(_Capture(name, mod))
    return caps


@contextmanager
def _capturing(caps: list[_Capture]):
    def hook(cap):
        def fn(_mod, args, output):
            cap.inputs = args[0].detach()
            cap.output = output
        return fn

    handles = [c.module.register_forward_hook(hook(c)) for c in caps]
    try:
        yield caps
    finally:
        for h in handles:
            h.remove()
        for c in caps:
            c.inputs = c.output = None


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token loss over its labelled tokens: [n, T, V], [n, T] -> [n].

    Position t predicts labels[t + 1]; the last position has no target (-100). The logits stay
    [n * T, V] rows, contiguous, as a training loss has them: a [n, V, T] layout (the vocabulary
    strided) makes the log-softmax and its backward several times slower (5x on a CPU at
    SmolLM2's 49k vocabulary) and a sliced copy of the logits costs memory.
    """
    n, T, V = logits.shape
    next_labels = F.pad(labels[:, 1:], (0, 1), value=-100)           # (n, T)
    tok = F.cross_entropy(logits.float().reshape(n * T, V), next_labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(n, T)
    count = (next_labels != -100).sum(1).clamp(min=1)
    return tok.sum(1) / count


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded row equals the same row unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def _requires_grad(caps: list[_Capture]):
    """Let the graph reach the chosen LoRA weights (an adapter loaded for inference is frozen)."""
    before = [c.module.weight.requires_grad for c in caps]
    for c in caps:
        c.module.weight.requires_grad_(True)
    try:
        yield
    finally:
        for c, b in zip(caps, before):
            c.module.weight.requires_grad_(b)


@contextmanager
def lora_capture(model, adapter: str | None = None):
    """Hooks on the LoRA factors to differentiate, gradients enabled to reach them: yields their
    _Capture list, filled by the next forward (`capture_loss`). Restores everything on exit."""
    caps = _lora_captures(model, adapter)
    with _capturing(caps), _requires_grad(caps), torch.enable_grad():
        yield caps


def capture_loss(model, batch: dict) -> torch.Tensor:
    """The forward inside `lora_capture`: sum over examples of each one's mean token loss."""
    device = model_device(model)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    return per_example_loss(out.logits, batch["labels"]).sum()


def output_gradients(loss: torch.Tensor, caps: list[_Capture]) -> list[torch.Tensor | None]:
    """d loss / d (each LoRA factor's output) [n, T, out], one backward for the batch."""
    return list(torch.autograd.grad(loss, [c.output for c in caps], allow_unused=True))


# bf16/fp16 matmuls with float32 accumulation straight into a float32 result, where torch has
# them (CUDA); elsewhere, or if the op is missing, both operands are copied to float32 first.
# Either way each product of two half-precision numbers is exact in float32: only the order of
# the float32 sums may differ.
_HALF = (torch.bfloat16, torch.float16)
_bmm_out_dtype = {"ok": True}


def example_gradients(cap: _Capture, e: torch.Tensor | None) -> torch.Tensor:
    """Every example's gradient of one LoRA factor, float32 [n, out*in] (eq. 2):
    dW_i = sum_t e_{i,t} u_{i,t}^T : (n, T, out) x (n, T, in) -> (n, out, in)."""
    w, u = cap.module.weight, cap.inputs                              # (out, in), (n, T, in)
    if e is None:
        return torch.zeros(u.shape[0], w.numel(), device=w.device)
    eT = e.transpose(1, 2)                                            # (n, out, T)
    if e.is_cuda and e.dtype in _HALF and u.dtype == e.dtype and _bmm_out_dtype["ok"]:
        try:
            return torch.bmm(eT, u, out_dtype=torch.float32).reshape(len(e), -1)
        except (TypeError, RuntimeError, NotImplementedError):   # an older torch: no bmm.dtype
            _bmm_out_dtype["ok"] = False
    return torch.bmm(eT.float(), u.float()).reshape(len(e), -1)


def iter_per_example_gradients(model, batch: dict, adapter: str | None = None):
    """Yield (name, offset, grad [n, numel]) per LoRA parameter, from one backward pass.

    Offsets are positions in the flattened `model.named_parameters()` order of the trainable
    LoRA parameters (or of adapter `adapter`'s, which must be the active one). Dropout must be
    off (model.eval()) for gradients to be deterministic. The batch moves to the model's device;
    the gradients are float32 on that device.
    """
    with lora_capture(model, adapter) as caps:
        grads = output_gradients(capture_loss(model, batch), caps)
        offset = 0
        for i, cap in enumerate(caps):
            g = example_gradients(cap, grads[i])
            # after the backward these references alone keep the activations and output
            # gradients alive: let each go once used, so memory falls as the loop goes on
            grads[i] = cap.inputs = cap.output = None
            yield cap.name, offset, g
            offset += cap.module.weight.numel()


def per_example_gradients(model, batch: dict) -> torch.Tensor:
    """Every example's gradient of its own mean token loss w.r.t. the LoRA parameters.

    batch: input_ids, attention_mask, labels [n, T] (-100 = no loss; labels are shifted inside).
    Returns [n, p], flattened in `model.named_parameters()` order, from one backward pass.
    """
    return torch.cat([g for _, _, g in iter_per_example_gradients(model, batch)], dim=1)


class Preconditioner(Protocol):
    """Maps one parameter's per-example gradients [n, numel] to the vectors that get projected."""

    def __call__(self, name: str, g: torch.Tensor) -> torch.Tensor: ...


class AdamPreconditioner:
    """LESS's Adam-preconditioned gradient (docs/method.md, step 2):

        m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  feature = m' / (sqrt(v') + eps)

    The moments move to the gradients' device on first use (float32), already scaled by b1, b2.
    """

    def __init__(self, moments: dict[str, tuple[torch.Tensor, torch.Tensor]], betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.moments, self.betas, self.eps = moments, betas, eps
        self._cache: dict = {}

    def __call__(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if name not in self.moments:
            raise KeyError(f"no Adam moments saved for parameter {name}")
        b1, b2 = self.betas
        b1m, b2v = self._scaled(name, g.device)                       # (1, numel) each
        # in place on two [n, numel] buffers, with the operations (and so the float32 roundings)
        # of m' / (sqrt(v') + eps) written out: b1 m + (1 - b1) g, b2 v + ((1 - b2) g) g
        m2 = torch.mul(g, 1 - b1).add_(b1m)
        v2 = torch.mul(g, 1 - b2).mul_(g).add_(b2v)
        return m2.div_(v2.sqrt_().add_(self.eps))

    def _scaled(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(b1 m, b2 v) as float32 [1, numel] on `device`: the same for every batch, so made once."""
        key = (name, torch.device(device))
        if key not in self._cache:
            m, v = self.moments[name]
            b1, b2 = self.betas
            m, v = m.to(device, torch.float32).reshape(1, -1), v.to(device, torch.float32).reshape(1, -1)
            self._cache[key] = (b1 * m, b2 * v)
        return self._cache[key]


def sgd_preconditioner(name: str, g: torch.Tensor) -> torch.Tensor:
    """The plain gradient."""
    return g


# The registered builders (elrea.registry.PRECONDITIONERS): builder(adapter_dir holding
# adam_moments.safetensors, LoRA parameter names) -> Preconditioner.
def adam_from_run(adapter_dir: Path, names: list[str]) -> Preconditioner:
    from .training import ADAM_BETAS, ADAM_EPS, load_moments

    return AdamPreconditioner(load_moments(adapter_dir, names), betas=ADAM_BETAS, eps=ADAM_EPS)


def sgd_from_run(adapter_dir: Path, names: list[str]) -> Preconditioner:
    return sgd_preconditioner


def make_preconditioner(name: str, adapter_dir: str | Path, names: list[str]) -> Preconditioner:
    """The preconditioner registered as `name` (elrea.registry.PRECONDITIONERS: adam, sgd, ...)."""
    return PRECONDITIONERS.get(name)(Path(adapter_dir), names)


def batch_features(model, batch: dict, projector, precondition=sgd_preconditioner,
                   adapter: str | None = None, block_norm: bool = False) -> torch.Tensor:
    """Unit-norm projected features [n, d] of one batch: delta_i = P precond(g_i) / ||.||.

    block_norm: scale each layer's part of precond(g_i) to unit norm before projecting (the
    projection is linear, so each layer is projected on its own, scaled, and added).
    Computed (float32) on the model's device, and returned there.
    """
    n = batch["input_ids"].shape[0]
    device = model_device(model)
    out = torch.zeros(n, projector.dim, dtype=torch.float32, device=device)
    if not block_norm:
        for name, offset, g in iter_per_example_gradients(model, batch, adapter):
            projector.project_block(precondition(name, g), offset, out)
        return F.normalize(out, dim=1)
    part = torch.zeros_like(out)
    sq = torch.zeros(n, dtype=torch.float32, device=device)
    current = None

    def flush():
        out.add_(part / sq.sqrt().clamp(min=1e-30)[:, None])
        part.zero_()
        sq.zero_()

    for name, offset, g in iter_per_example_gradients(model, batch, adapter):
        key = layer_of(name)
        if current is not None and key != current:
            flush()
        current = key
        v = precondition(name, g)
        sq.add_((v * v).sum(1))
        projector.project_block(v, offset, part)
    if current is not None:
        flush()
    return F.normalize(out, dim=1)


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: the text up to its first numeric path part
    ("...layers.3.self_attn.q_proj.lora_A..." -> "...layers.3"), or the name itself."""
    parts = param_name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return param_name


def num_lora_params(model, adapter: str | None = None) -> int:
    return sum(c.module.weight.numel() for c in _lora_captures(model, adapter))


def lora_param_names(model, adapter: str | None = None) -> list[str]:
    return [c.name for c in _lora_captures(model, adapter)]


def plan_batches(lengths: list[int], batch_size: int, max_tokens: int = 0) -> list[tuple[int, int]]:
    """Consecutive batches (start, end) of at most `batch_size` examples and, if `max_tokens` > 0,
    at most `max_tokens` padded tokens (examples x longest); a longer example runs alone.

    The plan depends on the data and the settings only, never on the number of processes, so
    that N processes compute exactly the batches one process would.
    """
    plan, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest_with = max(longest, n)
        full = i - start >= batch_size or (max_tokens > 0 and (i - start + 1) * longest_with > max_tokens)
        if i > start and full:
            plan.append((start, i))
            start, longest_with = i, n
        longest = longest_with
    if start < len(lengths):
        plan.append((start, len(lengths)))
    return plan


PROBE_TOKENS = 1024       # a featurizer's first batch, whose memory is measured, has at most this many
MEMORY_FRACTION = 0.5     # padded tokens; later batches stay within this share of the free memory


def tighter(a: int, b: int) -> int:
    """The tighter of two token limits where 0 means none."""
    return min(a, b) if a > 0 and b > 0 else max(a, b)


@dataclass
class Featurizer:
    """What a gradient feature needs, in one place (docs/method.md, steps 2 and 5):

        delta_i = P precond(grad_Q L_instr(x_i)) / ||.||

    model: a PEFT model holding `adapter` (active); projector: P (elrea.projection);
    precondition: `adam` or `sgd` (PRECONDITIONERS); batches of at most `batch_size` examples
    and `max_tokens` padded tokens. Everything runs on the model's device; `fit` (training
    features), `ELREA.route` (routing features) and the benchmarks all build it with `for_run`.

    Examples are taken in units of `window` x `batch_size` consecutive ones (the plan: what
    processes share and the store commits), and inside a unit batched longest first, each
    example's row put back in its place: on a mixture of tasks, batches in file order were
    padded to about twice their real tokens (docs/benchmarks.md, "Padding"), and a backward
    pass costs what its padded tokens do. A feature does not depend on its batch.

    Memory: the first batch holds at most PROBE_TOKENS padded tokens and its peak memory is
    measured (elrea.models.PeakMemory); from then on batches hold at most as many tokens as fit
    in `memory_fraction` of the memory that was free before it (elrea.models.free_memory), or
    `max_tokens` if that is fewer. A backward pass's memory grows with its padded tokens, and on
    a CPU running out of it is a kill without a message (docs/method.md, "Feature batches").
    memory_fraction=None: `max_tokens` alone.
    """

    model: object
    projector: object
    precondition: Preconditioner = sgd_preconditioner
    adapter: str | None = "base"
    pad_id: int = 0
    batch_size: int = 16
    max_tokens: int = 0
    block_norm: bool = False
    window: int = 8
    memory_fraction: float | None = MEMORY_FRACTION
    token_cap: int | None = field(default=None, init=False)   # set by the first batch: 0 = no limit
    bytes_per_token: float | None = field(default=None, init=False)   # the first batch's peak / its tokens
    free_bytes: int | None = field(default=None, init=False)          # free memory before it

    @classmethod
    def for_run(cls, model, cfg, base_dir: str | Path, pad_id: int, preconditioner: str,
                adapter: str = "base", batch_size: int | None = None) -> "Featurizer":
        """The run's featurizer: its projection (seeded from the run seed) and `preconditioner`
        (`adam` reads base_dir/adam_moments.safetensors)."""
        from .projection import make_projector

        f = cfg.features
        projector = make_projector(f.projection, num_lora_params(model, adapter), f.dim,
                                   cfg.stage_seed("projection"), f.sjlt_nnz)
        precondition = make_preconditioner(preconditioner, base_dir, lora_param_names(model, adapter))
        return cls(model, projector, precondition, adapter, pad_id, batch_size or f.batch_size,
                   f.max_tokens_per_batch, f.block_norm)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def plan(self, examples: list, window: int | None = None) -> list[tuple[int, int]]:
        """Units (start, end) of `window` (default the featurizer's) x `batch_size` consecutive
        examples, the last shorter."""
        unit = (window or self.window) * self.batch_size
        return [(s, min(s + unit, len(examples))) for s in range(0, len(examples), unit)]

    def batch(self, examples: list, on_batch=None) -> torch.Tensor:
        """Features [n, d] of data.Encoded examples, on the model's device: batched longest first
        (at most batch_size examples and the token cap each), rows in input order; on_batch(k)
        after each batch of k."""
        lengths = [len(e.input_ids) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: -lengths[i])
        out, done = None, 0
        while done < len(order):              # one batch at a time: the first one sets the cap
            probe = self.token_cap is None and self.memory_fraction is not None
            cap = tighter(self.max_tokens, PROBE_TOKENS) if probe else self.max_tokens_now()
            head = order[done:done + self.batch_size]
            idx = head[:plan_batches([lengths[i] for i in head], self.batch_size, cap)[0][1]]
            free = free_memory(self.device) if probe else None
            with PeakMemory(self.device) if probe else nullcontext() as peak:
                rows = self._features([examples[i] for i in idx])
            if probe:
                self._fit_cap(peak.bytes, free, len(idx), lengths[idx[0]])
            if on_batch is not None:
                on_batch(len(idx))
            if out is None:
                out = rows.new_empty(len(examples), rows.shape[1])
            out[torch.tensor(idx, device=rows.device)] = rows
            done += len(idx)
        return out

    def max_tokens_now(self) -> int:
        """The padded tokens a batch may hold now (0: no limit): `max_tokens`, lowered to what
        fits in memory once the first batch has been measured."""
        return self.max_tokens if self.token_cap is None else self.token_cap

    def _fit_cap(self, peak: int | None, free: int | None, rows: int, longest: int) -> None:
        """Set the token cap from the first batch's peak memory over its padded tokens."""
        self.free_bytes = free
        if not peak or free is None:
            self.token_cap = self.max_tokens          # nothing measured: the setting alone
            return
        per_token = self.bytes_per_token = peak / (rows * longest)
        fit = max(1, int(self.memory_fraction * free / per_token))
        self.token_cap = tighter(self.max_tokens, fit)
        if fit < longest:
            log.warning("gradient features: one example of %d tokens needs about %.1f GiB, more than %d%% of "
                        "the %.1f GiB free; if the process is killed, lower data.max_length or free memory",
                        longest, per_token * longest / 2 ** 30, round(100 * self.memory_fraction),
                        free / 2 ** 30)
        elif self.token_cap != self.max_tokens:
            log.info("gradient features: at most %d padded tokens a batch (features.max_tokens_per_batch=%d), "
                     "to stay within %d%% of the %.1f GiB free at %.2f MiB a token", self.token_cap,
                     self.max_tokens, round(100 * self.memory_fraction), free / 2 ** 30, per_token / 2 ** 20)

    def _features(self, examples: list) -> torch.Tensor:
        from .data import collate

        batch = collate(examples, self.pad_id, side="right")
        return batch_features(self.model, batch, self.projector, self.precondition, self.adapter,
                              self.block_norm)

    def features(self, examples: list) -> torch.Tensor:
        """Features [n, d] of any number of examples, batch by batch as planned."""
        if not examples:
            return torch.zeros(0, self.projector.dim, device=self.device)
        return torch.cat([self.batch(examples[s:e]) for s, e in self.plan(examples)])

    def extract(self, examples: list, store, procs=None, checkpoint_every: int = 16,
                desc: str = "gradient features") -> None:
        """Write the features of `examples` into `store` (a prepared rundir.FeatureStore).

        This process computes its contiguous share of the plan's units (all of them when alone),
        resuming after the rows its shard has committed, and commits about every
        `checkpoint_every` batches (whole units). Features leave the device only here, to be
        written.
        """
        from tqdm.auto import tqdm

        from .distributed import Processes

        procs = procs or Processes(0, 1, self.device)
        window = min(self.window, checkpoint_every)         # a commit falls between units
        mine = procs.split(self.plan(examples, window))
        if not mine:
            return
        shard = store.shard(mine[0][0], mine[-1][1])
        # after the rows committed (a store written under another plan may stop inside a unit)
        todo = [(max(s, shard.done), e) for s, e in mine if e > shard.done]
        every = max(1, checkpoint_every // window)                 # units per commit
        if shard.done > shard.start:
            log.info("%s: resuming at example %d of %d", desc, shard.done, len(examples))
        bar = tqdm(total=shard.end - shard.start, initial=shard.end - shard.start - sum(e - s for s, e in todo),
                   desc=desc if procs.world == 1 else f"{desc} [{procs.rank + 1}/{procs.world}]",
                   unit="ex", dynamic_ncols=True,
                   disable=not procs.is_main or not logging.getLogger("elrea").isEnabledFor(logging.INFO))
        try:
            for k, (s, e) in enumerate(todo, start=1):
                shard.write(s, self.batch(examples[s:e], on_batch=bar.update).cpu().numpy())
                if k % every == 0:
                    shard.commit(e)
            shard.commit(shard.end)
        finally:
            bar.close()
            shard.close()
