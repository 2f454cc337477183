"""The learned router: a small classifier from the backbone's hidden states of a prompt to the
gradient clusters (fitted in the `router` stage of `fit`), so that routing needs a partial
forward pass of the prompt and no backward pass.

Signal: the output of decoder layer `routing.learned_layer` (default L // 2; 0 = the token
embeddings) of the backbone with every adapter disabled, pooled over the instruction's tokens
(`mean`, or the `last` token's), standardised with the training mean and std. The forward
stops at that layer. Classifier: multinomial logistic regression (default) or a one-hidden-
layer ReLU MLP (scikit-learn), trained on the training instructions with the cluster labels;
the stage reports its training and 5-fold cross-validated accuracy. At inference, with p the
classifier's probabilities over the C experts,

    w_c = p_c^(1/tau) / sum_j p_j^(1/tau)  (c = 1..C),   w_0 = 0 (the base adapter),

then top-k as for every router. Saved as router/learned.safetensors + router/learned.json.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import RunDirError
from . import RouterPlugin
from ._similarity import MIN_TAU, keep_top_k

log = logging.getLogger(__name__)

WEIGHTS, META = "learned.safetensors", "learned.json"


class _Reached(Exception):
    """Raised by the hook on the chosen layer: the rest of the forward pass is not needed."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (plain or wrapped by PEFT)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(base.config, "num_hidden_layers", None)
    for _, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise NotImplementedError(f"{type(base).__name__}: found no list of {n} decoder layers for the learned router")


def resolve_layer(model, layer: int) -> int:
    L = len(decoder_layers(model))
    if layer == -1:
        return L // 2
    if not 0 <= layer <= L:
        raise ValueError(f"routing.learned_layer={layer}: the backbone has layers 0..{L}")
    return layer


@torch.no_grad()
def hidden_states(model, examples: list, layer: int, pooling: str, pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Pooled hidden states [n, hidden] (float32, on the model's device) of data.Encoded examples
    at `layer` (resolved: 0..L) of the backbone, adapters disabled; pooling over the tokens that
    carry instruction loss ("mean") or the last of them ("last")."""
    from ..data import collate
    from ..fastlora import adapters_off
    from ..features import position_ids_from_mask
    from ..models import model_device

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = base.get_input_embeddings() if layer == 0 else decoder_layers(model)[layer - 1]
    seen = {}

    def hook(_mod, _args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    device = model_device(model)
    out = []
    handle = target.register_forward_hook(hook)
    try:
        with adapters_off(model):
            for s in range(0, len(examples), batch_size):
                b = collate(examples[s:s + batch_size], pad_id, side="right")
                ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False)
                except _Reached:
                    pass
                h = seen.pop("h").float()                                  # (n, T, hidden)
                keep = (b["labels"] != -100).to(device) & mask.bool()
                keep = torch.where(keep.any(1, keepdim=True), keep, mask.bool())   # no loss tokens: all
                if pooling == "last":
                    last = (keep.long() * torch.arange(keep.shape[1], device=device)).argmax(1)
                    out.append(h[torch.arange(len(h), device=device), last])
                else:
                    k = keep[..., None].float()
                    out.append((h * k).sum(1) / k.sum(1))
    finally:
        handle.remove()
    return torch.cat(out) if out else torch.zeros(0, base.config.hidden_size, device=device)


def fit_classifier(H: np.ndarray, labels: np.ndarray, kind: str, hidden: int, seed: int) -> tuple[dict, dict]:
    """(tensors, info): a standardised logistic regression or MLP from H [N, h] to labels 1..C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier

    mean, std = H.mean(0), H.std(0) + 1e-6
    Z = (H - mean) / std
    if kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500, random_state=seed % 2**31)
    else:
        clf = LogisticRegression(max_iter=2000, C=1.0)
    folds = int(min(5, np.bincount(labels)[1:].min()))
    cv = float(np.mean(cross_val_score(clf, Z, labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed % 2**31)))) \
        if folds >= 2 else None
    clf.fit(Z, labels)
    t = {"mean": mean, "std": std}
    if kind == "mlp":
        t.update(w1=clf.coefs_[0].T, b1=clf.intercepts_[0], w2=clf.coefs_[1].T, b2=clf.intercepts_[1])
        if t["w2"].shape[0] == 1:  # two classes: one logistic output z = logit of class 2
            t["w2"], t["b2"] = np.vstack([np.zeros_like(t["w2"]), t["w2"]]), np.concatenate([[0.0], t["b2"]])
    else:
        W, b = clf.coef_, clf.intercept_
        if W.shape[0] == 1:
            W, b = np.vstack([np.zeros_like(W), W]), np.concatenate([[0.0], b])
        t.update(w=W, b=b)
    info = {"classifier": kind, "classes": [int(c) for c in clf.classes_],
            "train_accuracy": float(clf.score(Z, labels)), "cv_accuracy": cv, "cv_folds": folds}
    # C order: safetensors writes the raw buffer, and scikit-learn may hand back Fortran-ordered arrays
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}, info


def classifier_logits(t: dict, x: torch.Tensor) -> torch.Tensor:
    z = (x - t["mean"]) / t["std"]
    if "w1" in t:
        z = torch.relu(z @ t["w1"].T + t["b1"])
        return z @ t["w2"].T + t["b2"]
    return z @ t["w"].T + t["b"]


def fit_learned_router(job) -> dict:
    """Fit the classifier on the training instructions' hidden states (an elrea.routers.RouterFit);
    save it in job.folder."""
    from safetensors.numpy import save_file

    from ..rundir import atomic_path, write_json

    t0 = time.time()
    model, examples, routing, out_dir = job.model, job.instructions, job.cfg, job.folder
    layer = resolve_layer(model, routing.learned_layer)
    H = hidden_states(model, examples, layer, routing.learned_pooling, job.tokenizer.pad_token_id,
                      routing.batch_size).cpu().numpy()
    tensors, info = fit_classifier(H, job.labels, routing.learned_classifier, routing.learned_hidden, job.seed)
    info.update(layer=layer, pooling=routing.learned_pooling, examples=len(examples), hidden_size=int(H.shape[1]),
                seconds=round(time.time() - t0, 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / META, info)
    log.info("learned router: layer %d, %s, training accuracy %.3f, cross-validated %s", layer,
             info["classifier"], info["train_accuracy"],
             "n/a" if info["cv_accuracy"] is None else f"{info['cv_accuracy']:.3f}")
    return info


class LearnedRouter:
    name = "learned"

    def __init__(self, model):
        from safetensors.torch import load_file

        from ..rundir import read_json

        d = model.run.router
        if not (d / WEIGHTS).exists():
            raise RunDirError(f"{d / WEIGHTS}: missing; the learned router is fitted in the router stage: "
                              f"run `elrea fit` again on this run directory (it resumes at that stage)")
        self.meta = read_json(d / META)
        self.tensors = {k: v.to(model.device) for k, v in load_file(str(d / WEIGHTS)).items()}
        if not all(torch.isfinite(t).all() for t in self.tensors.values()):
            raise RunDirError(f"{d / WEIGHTS}: non-finite weights (NaN or inf); re-run the `elrea fit` that made "
                              f"{model.run_dir} (it refits a damaged router), or `elrea fit --from router`")
        self.model, self.num_adapters = model, len(model.adapters)
        self.batch_size = model.config.routing.batch_size

    def signal(self, examples: list) -> torch.Tensor:
        m = self.model
        return hidden_states(m.model, examples, self.meta["layer"], self.meta["pooling"],
                             m.tokenizer.pad_token_id, self.batch_size)

    def weights(self, signal: torch.Tensor, n: int, tau: float = 1.0, top_k: int = 0) -> torch.Tensor:
        logp = torch.log_softmax(classifier_logits(self.tensors, signal.float()), dim=1)
        p = torch.softmax(logp / max(tau, MIN_TAU), dim=1).cpu()
        w = torch.zeros(n, self.num_adapters, device="cpu")
        w[:, self.meta["classes"]] = p
        return keep_top_k(w, top_k)


PLUGIN = RouterPlugin(build=LearnedRouter, fit=fit_learned_router,
                      fit_fields=("learned_classifier", "learned_layer", "learned_pooling", "learned_hidden"))
