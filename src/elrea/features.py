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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import lora_parameters

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
    """Each example's mean next-token loss over its labelled tokens: [n, T, V], [n, T] -> [n]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                          reduction="none")                          # (n, T-1)
    count = (shift_labels != -100).sum(1).clamp(min=1)
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


def iter_per_example_gradients(model, batch: dict, adapter: str | None = None):
    """Yield (name, offset, grad [n, numel]) per LoRA parameter, from one backward pass.

    Offsets are positions in the flattened `model.named_parameters()` order of the trainable
    LoRA parameters (or of adapter `adapter`'s, which must be the active one). Dropout must be
    off (model.eval()) for gradients to be deterministic.
    """
    caps = _lora_captures(model, adapter)
    with _capturing(caps), _requires_grad(caps), torch.enable_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
        loss = per_example_loss(out.logits, batch["labels"]).sum()
        outputs = [c.output for c in caps]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        offset = 0
        for cap, e in zip(caps, grads):
            w = cap.module.weight                                     # (out, in)
            if e is None:
                g = torch.zeros(cap.inputs.shape[0], w.numel())
            else:
                # dW_i = sum_t e_{i,t} u_{i,t}^T : (n, T, out) x (n, T, in) -> (n, out, in)
                g = torch.bmm(e.transpose(1, 2).float(), cap.inputs.float()).reshape(len(e), -1)
            yield cap.name, offset, g
            offset += w.numel()


def per_example_gradients(model, batch: dict) -> torch.Tensor:
    """Every example's gradient of its own mean token loss w.r.t. the LoRA parameters.

    batch: input_ids, attention_mask, labels [n, T] (-100 = no loss; labels are shifted inside).
    Returns [n, p], flattened in `model.named_parameters()` order, from one backward pass.
    """
    return torch.cat([g for _, _, g in iter_per_example_gradients(model, batch)], dim=1)


class AdamPreconditioner:
    """LESS's Adam-preconditioned gradient (docs/method.md, step 2):

        m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  feature = m' / (sqrt(v') + eps)
    """

    def __init__(self, moments: dict[str, tuple[torch.Tensor, torch.Tensor]], betas=(0.9, 0.999),
                 eps: float = 1e-8):
        self.moments, self.betas, self.eps = moments, betas, eps

    def __call__(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if name not in self.moments:
            raise KeyError(f"no Adam moments saved for parameter {name}")
        m, v = self.moments[name]
        b1, b2 = self.betas
        m2 = b1 * m.reshape(1, -1) + (1 - b1) * g
        v2 = b2 * v.reshape(1, -1) + (1 - b2) * g * g
        return m2 / (v2.sqrt() + self.eps)


def sgd_preconditioner(name: str, g: torch.Tensor) -> torch.Tensor:
    return g


def batch_features(model, batch: dict, projector, precondition=sgd_preconditioner,
                   adapter: str | None = None) -> torch.Tensor:
    """Unit-norm projected features [n, d] of one batch: delta_i = P precond(g_i) / ||.||."""
    out = torch.zeros(batch["input_ids"].shape[0], projector.dim)
    for name, offset, g in iter_per_example_gradients(model, batch, adapter):
        projector.project_block(precondition(name, g), offset, out)
    return F.normalize(out, dim=1)


def num_lora_params(model, adapter: str | None = None) -> int:
    return sum(c.module.weight.numel() for c in _lora_captures(model, adapter))


def lora_param_names(model, adapter: str | None = None) -> list[str]:
    return [c.name for c in _lora_captures(model, adapter)]


def extract_features(model, examples: list, projector, store, pad_id: int, batch_size: int = 16,
                     precondition=sgd_preconditioner, adapter: str | None = None,
                     checkpoint_every: int = 16, desc: str = "gradient features") -> None:
    """Fill `store` (a FeatureStore) with the features of `examples` (data.Encoded), resuming
    after its last committed row and committing every `checkpoint_every` batches."""
    from tqdm.auto import tqdm

    from .data import collate

    n = len(examples)
    start = store.done
    if start:
        log.info("%s: resuming at example %d of %d", desc, start, n)
    bar = tqdm(total=n, initial=start, desc=desc, unit="ex", dynamic_ncols=True)
    for k, s in enumerate(range(start, n, batch_size), start=1):
        batch = collate(examples[s:s + batch_size], pad_id, side="right")
        store.write(s, batch_features(model, batch, projector, precondition, adapter).numpy())
        bar.update(min(batch_size, n - s))
        if k % checkpoint_every == 0:
            store.commit(min(s + batch_size, n))
    bar.close()
    store.finish()
