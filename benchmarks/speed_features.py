"""python benchmarks/speed_features.py  -- per-example gradient features: elrea against the LESS way.

Measures, on smollm2-135m-instruct with LoRA rank 8 on all linear layers (B randomised, eval
mode), for instruction-only prompts of the built-in reasoning-mix, in one run:

- reference ("LESS way"): one backward per example (torch.autograd.grad of that example's
  mean token loss w.r.t. the LoRA parameters), flattened, then the dense seeded Rademacher
  projection (elrea.projection.RademacherProjector) of the collected batch;
- elrea: one backward per batch giving every example's gradient, streamed into the sparse
  JL projection (elrea.features.batch_features with SparseProjector);
- elrea's batched gradients with the SAME dense projection: per-example cosine to the
  reference (must be >= 0.999), i.e. the speed-up changes nothing but the projection;
- a plain training forward+backward on the same batches (the floor any gradient method pays).

The dense projection generates the whole p x d sign matrix (~2.4M x 8192 = 20G signs) per
pass, whatever the batch: on a CPU it takes minutes and dominates the reference, so the
reference runs on few examples (--ref-examples) and is reported per example, with its
gradient-only time next to elrea's so that the two sources of the gain are visible.

`--profile` instead times the phases of elrea's features on the same batches (forward with
hooks, backward to the LoRA outputs, per-example outer products, Adam preconditioning, sparse
projection, normalise; apart: the projection as it was before, nnz scatters per chunk) next to
a training step's forward and backward, each phase's share, and the whole of each unprofiled
(-> benchmarks/results/speed_features_profile.json). benchmarks/gpu.py prints the same table
for Llama-3.2-1B shapes on a GPU (CUDA events there).

Options: --batch-size 16 --examples 64 --ref-examples 16 --dim 8192 --threads N --quick
(tiny model, for tests) --profile --out benchmarks/results/speed_features.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COSINE_MIN = 0.999
TARGET_SPEEDUP, TARGET_OVERHEAD = 8.0, 1.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, "speed_features")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--examples", type=int, default=64, help="examples timed for elrea and plain fwd+bwd")
    ap.add_argument("--ref-examples", type=int, default=16,
                    help="examples for the reference and the agreement check (the first ones)")
    ap.add_argument("--dim", type=int, default=8192, help="projection dimension")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    ap.add_argument("--profile", action="store_true",
                    help="time the phases of the features against a training step instead "
                         "(-> speed_features_profile.json)")
    args = ap.parse_args(argv)
    if args.profile and not args.out:
        args.out = str(C.default_out(args, "speed_features_profile"))
    if args.quick:  # small enough for a test; --batch-size etc. given explicitly still win
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, attr, value in [("--examples", "examples", 8), ("--ref-examples", "ref_examples", 4),
                                  ("--batch-size", "batch_size", 4), ("--dim", "dim", 256),
                                  ("--repeats", "repeats", 1)]:
            if flag not in given:
                setattr(args, attr, value)
    args.examples = max(args.examples, args.ref_examples)   # the reference set is a prefix of it
    return args


# ----------------------------------------------------------------------------- set-up

def build(args):
    """(PEFT LoRA model in eval mode with random B, encoded instruction-only examples, info)."""
    from peft import get_peft_model

    from elrea.config import LoraConfig
    from elrea.data import PromptFormatter
    from elrea.models import peft_lora_config

    backbone, tok, name = C.load_model(args)
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(rank=args.rank)))
    C.randomize_lora_b(model, args.b_std, args.seed)
    model.eval()   # dropout off: per-example gradients must be deterministic to compare them
    texts, origin = C.instructions(args.examples, "train", args.seed, args.quick)
    fmt = PromptFormatter(tok)
    encoded = [fmt.encode_instruction([{"role": "user", "content": t}]) for t in texts]
    lengths = [len(e.input_ids) for e in encoded]
    info = {"model": name, "data": origin, "pad_id": tok.pad_token_id,
            "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths),
            "mean_loss_tokens": round(sum(sum(x != -100 for x in e.labels) for e in encoded) / len(encoded), 1)}
    return model, encoded, info


def batches_of(encoded, batch_size: int, pad_id: int):
    from elrea.data import collate

    return [collate(encoded[s:s + batch_size], pad_id, side="right") for s in range(0, len(encoded), batch_size)]


# ----------------------------------------------------------------------------- the methods

def reference_gradients(model, params, examples) -> torch.Tensor:
    """The LESS way: one forward+backward per example, all LoRA gradients flattened: [n, p]."""
    from elrea.features import per_example_loss
    from elrea.models import model_device

    device = model_device(model)
    rows = []
    for e in examples:
        ids = torch.tensor([e.input_ids], device=device)
        labels = torch.tensor([e.labels], device=device)
        with torch.enable_grad():
            loss = per_example_loss(model(input_ids=ids, use_cache=False).logits, labels)[0]
            grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def elrea_gradients_only(model, batches) -> None:
    """The gradient half of batch_features: every per-example block computed, nothing projected."""
    from elrea.features import iter_per_example_gradients

    for b in batches:
        for _ in iter_per_example_gradients(model, b):
            pass


def elrea_features(model, batches, projector) -> torch.Tensor:
    from elrea.features import batch_features

    return torch.cat([batch_features(model, b, projector) for b in batches])


def plain_fwd_bwd(model, batches) -> None:
    """What one training step costs on the same tokens: HF loss, backward into .grad."""
    from elrea.models import model_device

    device = model_device(model)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                        use_cache=False)
            out.loss.backward()
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the phase profile

PROFILE_PHASES = [  # (key, label); the first six add up to the profiled features
    ("forward", "forward with hooks + per-example loss"),
    ("backward", "backward to the LoRA outputs"),
    ("outer", "per-example outer products (eq. 2)"),
    ("adam", "Adam preconditioning"),
    ("projection", "sparse JL projection (one scatter per chunk)"),
    ("normalise", "normalise"),
]
APART = [  # measured on the same gradients, not part of the features' sum
    ("projection_before", "  apart: the projection as nnz scatters per chunk (before)"),
    ("adam_before", "  apart: Adam as one out-of-place expression (before)"),
    ("half_to_float", "  apart: bf16/fp16 -> float32 copies of e and u (the fallback's)"),
]


class PhaseTimer:
    """Time named phases: CUDA events on a GPU (read once, at the end: no host sync inside the
    loop; an event pair also counts the GPU's idle time waiting for launches, which is what the
    phase costs), wall clock on a CPU. Seconds per phase, summed over the calls."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.events, self.seconds = [], {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            t = time.perf_counter()
            yield
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
            self.events = []
        return dict(self.seconds)


def synthetic_adam(model, adapter=None, seed: int = 0):
    """An AdamPreconditioner with moments shaped like a trained adapter's (m ~ N(0, 1e-3^2),
    v ~ U(0, 1e-6)): its cost does not depend on the values."""
    from elrea.features import AdamPreconditioner, _lora_captures

    gen = torch.Generator(device="cpu").manual_seed(seed)
    moments = {c.name: (torch.randn(c.module.weight.shape, generator=gen) * 1e-3,
                        torch.rand(c.module.weight.shape, generator=gen) * 1e-6)
               for c in _lora_captures(model, adapter)}
    return AdamPreconditioner(moments)


def adam_before(pre, name: str, g: torch.Tensor) -> torch.Tensor:
    """AdamPreconditioner's formula as it was written before (about eight [n, numel] temporaries)."""
    m, v = (t.to(g.device, torch.float32) for t in pre.moments[name])
    (b1, b2), eps = pre.betas, pre.eps
    return (b1 * m.reshape(1, -1) + (1 - b1) * g) / ((b2 * v.reshape(1, -1) + (1 - b2) * g * g).sqrt() + eps)


def profiled_features(model, batches, projector, precondition, timer, adapter=None, apart=True):
    """batch_features (block_norm off) phase by phase, through the library's own steps
    (elrea.features.lora_capture, capture_loss, output_gradients, example_gradients)."""
    from elrea.features import capture_loss, example_gradients, lora_capture, output_gradients
    from elrea.models import model_device

    device = model_device(model)
    feats = []
    for b in batches:
        n = b["input_ids"].shape[0]
        out = torch.zeros(n, projector.dim, device=device)
        spare = torch.zeros_like(out)
        with lora_capture(model, adapter) as caps:
            with timer("forward"):
                loss = capture_loss(model, b)
            with timer("backward"):
                grads = output_gradients(loss, caps)
            offset = 0
            for i, cap in enumerate(caps):
                e = grads[i]
                with timer("outer"):
                    g = example_gradients(cap, e)
                with timer("adam"):
                    v = precondition(cap.name, g)
                with timer("projection"):
                    projector.project_block(v, offset, out)
                if apart:
                    with timer("projection_before"):
                        projector.project_block_reference(v, offset, spare)
                    with timer("adam_before"):
                        adam_before(precondition, cap.name, g)
                    if e is not None and e.dtype != torch.float32:
                        with timer("half_to_float"):
                            e.float(), cap.inputs.float()
                grads[i] = cap.inputs = cap.output = e = None   # as iter_per_example_gradients does
                offset += cap.module.weight.numel()
            del grads, loss
        with timer("normalise"):
            feats.append(F.normalize(out, dim=1))
    return torch.cat(feats)


def plain_fwd_bwd_phases(model, batches, timer) -> None:
    """plain_fwd_bwd with its forward and backward timed apart."""
    from elrea.models import model_device

    device = model_device(model)
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with timer("train_forward"):
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                            use_cache=False)
            with timer("train_backward"):
                out.loss.backward()
    model.zero_grad(set_to_none=True)


def phase_profile(model, batches, projector, repeats: int, adapter=None, device="cpu") -> dict:
    """Seconds per batch of each phase of the features (Adam-preconditioned, as training features
    are) and of a plain training fwd+bwd on the same batches, medians over `repeats` passes; the
    features and the fwd+bwd also timed whole, unprofiled, in the same passes."""
    from elrea.features import batch_features

    precondition = synthetic_adam(model, adapter)
    sync = lambda: C.sync(device)   # noqa: E731

    def whole(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    profiled_features(model, batches[:1], projector, precondition, PhaseTimer(device), adapter)   # warm-up
    plain_fwd_bwd_phases(model, batches[:1], PhaseTimer(device))
    passes = []
    for _ in range(max(1, repeats)):
        timer = PhaseTimer(device)
        profiled_features(model, batches, projector, precondition, timer, adapter)
        plain_fwd_bwd_phases(model, batches, timer)
        sec = timer.totals()
        sec["features_whole"], feats = whole(lambda: torch.cat(
            [batch_features(model, b, projector, precondition, adapter) for b in batches]))
        sec["train_whole"], _ = whole(lambda: plain_fwd_bwd(model, batches))
        passes.append(sec)
    k = len(batches)
    med = {name: statistics.median(p.get(name, 0.0) for p in passes) / k for name in passes[0]}
    profiled = sum(med[name] for name, _ in PROFILE_PHASES)
    train = med["train_forward"] + med["train_backward"]
    return {"ms_per_batch": {name: 1000 * s for name, s in med.items()}, "batches": k, "repeats": repeats,
            "profiled_features_ms": 1000 * profiled, "profiled_train_ms": 1000 * train,
            "share_of_features": {name: med[name] / profiled for name, _ in PROFILE_PHASES + APART if name in med},
            "over_train": {name: med[name] / train for name, _ in PROFILE_PHASES + APART if name in med},
            "features_over_train_profiled": profiled / train,
            "features_over_train_whole": med["features_whole"] / med["train_whole"],
            "projection_before_over_after": (med["projection_before"] / med["projection"]
                                             if med.get("projection") else None),
            "timer": "cuda events" if torch.device(device).type == "cuda" else "wall clock"}


def profile_rows(prof: dict) -> list[list]:
    """Table rows: phase, ms per batch, share of the profiled features, x a training fwd+bwd."""
    ms, over = prof["ms_per_batch"], prof["over_train"]
    share = {k: f"{100 * v:.1f}%" for k, v in prof["share_of_features"].items()}
    rows = [[label, ms[name], share[name], over[name]] for name, label in PROFILE_PHASES]
    rows.append(["features, profiled (sum of the above)", prof["profiled_features_ms"], "100%",
                 prof["features_over_train_profiled"]])
    rows += [[label, ms[name], share[name], over[name]] for name, label in APART if name in ms]
    rows += [["training step: forward (HF loss)", ms["train_forward"], None, ms["train_forward"] / prof["profiled_train_ms"]],
             ["training step: backward into .grad", ms["train_backward"], None,
              ms["train_backward"] / prof["profiled_train_ms"]],
             ["features, whole (batch_features, Adam)", ms["features_whole"], None,
              prof["features_over_train_whole"]],
             ["training fwd+bwd, whole", ms["train_whole"], None, 1.0]]
    return rows


PROFILE_COLUMNS = ["phase (per batch)", "ms", "share of features", "x training fwd+bwd"]


# ----------------------------------------------------------------------------- the run

def run_profile(args) -> dict:
    from elrea.features import num_lora_params
    from elrea.projection import SparseProjector

    model, encoded, info = build(args)
    p = num_lora_params(model)
    batches = batches_of(encoded, args.batch_size, info["pad_id"])
    C.log(f"profile: {len(batches)} batches of {args.batch_size}, {args.repeats} passes ...")
    prof = phase_profile(model, batches, SparseProjector(p, args.dim, args.seed), args.repeats, device=args.device)
    config = {"batch_size": args.batch_size, "examples": len(encoded), "dim": args.dim, "lora_rank": args.rank,
              "lora_targets": "all-linear", "num_lora_params": p, "repeats": args.repeats, "seed": args.seed,
              "quick": args.quick, "preconditioner": "adam (synthetic moments)", **info}
    return {"benchmark": "speed_features_profile", "config": config, "profile": prof}


def run(args) -> dict:
    if args.profile:
        return run_profile(args)
    from elrea.features import num_lora_params, per_example_gradients
    from elrea.models import lora_parameters
    from elrea.projection import RademacherProjector, SparseProjector

    model, encoded, info = build(args)
    p = num_lora_params(model)
    params = [q for _, q in lora_parameters(model)]   # the same order as elrea's feature layout
    ref_ex = encoded[:args.ref_examples]
    batches = batches_of(encoded, args.batch_size, info["pad_id"])
    ref_batches = batches_of(ref_ex, args.batch_size, info["pad_id"])
    n, n_ref, R = len(encoded), len(ref_ex), {}

    def phase(name, fn, repeats, warmup=None, memory_run=True):
        """Time fn (median of `repeats`); sample its RSS in one extra untimed run, because the
        sampler thread competes for the GIL and slows fine-grained work. A phase too slow to
        run twice (the dense projection: long kernels, little Python) is sampled while timed."""
        R[name] = rec = {}
        C.log(f"{name} ..." + (" (dense projection: generates all p x d signs, minutes on a CPU)"
                             if "projection" in name else ""))
        if memory_run:
            med, times, out = C.timed(fn, repeats, warmup)
            with C.rss_phase(rec):
                fn()
        else:
            with C.rss_phase(rec):
                med, times, out = C.timed(fn, repeats, warmup)
        rec.update(seconds=med, all_seconds=[round(t, 4) for t in times], rss_sampled_while_timed=not memory_run)
        return out

    # reference: gradients (cheap enough to repeat), then one dense projection of the batch
    G_ref = phase("reference_gradients", lambda: reference_gradients(model, params, ref_ex), args.repeats,
                  warmup=lambda: reference_gradients(model, params, ref_ex[:1]))
    dense = RademacherProjector(p, args.dim, args.seed)
    ref_proj = phase("reference_projection", lambda: dense.project(G_ref), 1, memory_run=False,
                     warmup=lambda: dense.project(G_ref[:, :RademacherProjector.rows_per_chunk]))

    # elrea: the sparse projector caches its chunks; warm-up fills the cache as a long run would
    sparse = SparseProjector(p, args.dim, args.seed)
    feats = phase("elrea_features", lambda: elrea_features(model, batches, sparse), args.repeats,
                  warmup=lambda: elrea_features(model, batches[:1], sparse))
    phase("elrea_gradients", lambda: elrea_gradients_only(model, batches), args.repeats,
          warmup=lambda: elrea_gradients_only(model, batches[:1]))
    phase("plain_fwd_bwd", lambda: plain_fwd_bwd(model, batches), args.repeats,
          warmup=lambda: plain_fwd_bwd(model, batches[:1]))
    # agreement: elrea's batched gradients through the reference's dense projection (slow, once)
    feats_dense = phase("elrea_dense_projection", lambda: elrea_features(model, ref_batches, dense), 1,
                        warmup=lambda: None, memory_run=False)
    G_elrea = torch.cat([per_example_gradients(model, b) for b in ref_batches])
    return summarize(args, info, p, n, n_ref, len(batches), R,
                     agreement(G_ref, G_elrea, ref_proj, feats_dense, feats[:n_ref]))


def agreement(G_ref, G_elrea, ref_proj, feats_dense, feats_sparse) -> dict:
    # float64: a float32 cosine of 2.4M-long vectors is itself off by ~1e-4
    proj_cos = (F.normalize(ref_proj.double(), dim=1) * F.normalize(feats_dense.double(), dim=1)).sum(1)
    grad_cos = (F.normalize(G_ref.double(), dim=1) * F.normalize(G_elrea.double(), dim=1)).sum(1)
    # how well each projection keeps the exact pairwise gradient cosines (the geometry routing uses)
    exact = _gram(G_ref)
    out = {
        "projected_cosine_min": float(proj_cos.min()), "projected_cosine_mean": float(proj_cos.mean()),
        "gradient_cosine_min": float(grad_cos.min()),
        "gradient_max_abs_diff": float((G_ref - G_elrea).abs().max()),
        "gradient_max_abs": float(G_ref.abs().max()),
        "threshold": COSINE_MIN,
        "gram_max_abs_err_dense": float((_gram(ref_proj) - exact).abs().max()),
        "gram_max_abs_err_sparse": float((_gram(feats_sparse) - exact).abs().max()),
    }
    out["ok"] = bool(out["projected_cosine_min"] >= COSINE_MIN)
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.double(), dim=1)
    return x @ x.T


def summarize(args, info, p, n, n_ref, n_batches, R, agree) -> dict:
    s = {k: v["seconds"] for k, v in R.items()}
    ref_total = s["reference_gradients"] + s["reference_projection"]
    results = {
        "reference": {"examples": n_ref, "gradient_s": s["reference_gradients"],
                      "projection_s": s["reference_projection"], "total_s": ref_total,
                      "examples_per_s": n_ref / ref_total,
                      "gradient_only_examples_per_s": n_ref / s["reference_gradients"],
                      "projection_share": s["reference_projection"] / ref_total},
        "elrea": {"examples": n, "batches": n_batches, "total_s": s["elrea_features"],
                  "per_batch_s": s["elrea_features"] / n_batches,
                  "examples_per_s": n / s["elrea_features"],
                  "gradient_only_s": s["elrea_gradients"],
                  "gradient_only_examples_per_s": n / s["elrea_gradients"]},
        "plain_fwd_bwd": {"examples": n, "total_s": s["plain_fwd_bwd"],
                          "per_batch_s": s["plain_fwd_bwd"] / n_batches,
                          "examples_per_s": n / s["plain_fwd_bwd"]},
        "elrea_dense_projection": {"examples": n_ref, "total_s": s["elrea_dense_projection"],
                                   "examples_per_s": n_ref / s["elrea_dense_projection"]},
    }
    ratios = {
        "speedup_vs_reference": results["elrea"]["examples_per_s"] / results["reference"]["examples_per_s"],
        "gradient_only_speedup": (results["elrea"]["gradient_only_examples_per_s"]
                                  / results["reference"]["gradient_only_examples_per_s"]),
        "elrea_over_plain_fwd_bwd": s["elrea_features"] / s["plain_fwd_bwd"],
        "elrea_gradients_over_plain_fwd_bwd": s["elrea_gradients"] / s["plain_fwd_bwd"],
    }
    targets = {"speedup_ge_8": ratios["speedup_vs_reference"] >= TARGET_SPEEDUP,
               "overhead_le_1_5": ratios["elrea_over_plain_fwd_bwd"] <= TARGET_OVERHEAD,
               "cosine_ge_0_999": agree["ok"],
               "note": f"targets are stated for batch 16; this run used batch {args.batch_size}"}
    config = {"batch_size": args.batch_size, "examples": n, "ref_examples": n_ref, "dim": args.dim,
              "lora_rank": args.rank, "lora_targets": "all-linear", "b_std": args.b_std,
              "num_lora_params": p, "repeats": args.repeats, "seed": args.seed, "quick": args.quick, **info}
    return {"benchmark": "speed_features", "config": config, "results": results, "ratios": ratios,
            "agreement": agree, "targets": targets, "phases": R}


def show_profile(report: dict):
    c, prof = report["config"], report["profile"]
    C.print_table(
        f"Where the features' time goes: {c['model']}, {c['num_lora_params']:,} LoRA params -> {c['dim']}, "
        f"batch {c['batch_size']}, {prof['batches']} batches, median of {prof['repeats']} ({prof['timer']})",
        PROFILE_COLUMNS, profile_rows(prof),
        [f"features / training fwd+bwd: {prof['features_over_train_whole']:.2f} whole, "
         f"{prof['features_over_train_profiled']:.2f} profiled; the projection as nnz scatters took "
         f"{C.fmt(prof['projection_before_over_after'])}x the single scatter's time",
         C.machine_note(report)])


def show(report: dict):
    if report["benchmark"] == "speed_features_profile":
        return show_profile(report)
    r, ra, ag, ph = report["results"], report["ratios"], report["agreement"], report["phases"]
    ref, el, pl, ed = r["reference"], r["elrea"], r["plain_fwd_bwd"], r["elrea_dense_projection"]
    # peak RSS includes the model and what earlier phases still hold; growth is the method's own
    mem = lambda *names: [max(ph[k][f] for k in names) for f in ("peak_rss_mb", "rss_growth_mb")]  # noqa: E731
    rows = [
        ["reference: per-example backward + dense proj.", ref["examples"], ref["examples_per_s"],
         ref["gradient_only_examples_per_s"], 1.0, *mem("reference_gradients", "reference_projection")],
        ["elrea: batched gradients + sparse proj.", el["examples"], el["examples_per_s"],
         el["gradient_only_examples_per_s"], ra["speedup_vs_reference"], *mem("elrea_features", "elrea_gradients")],
        ["elrea batched gradients + dense proj.", ed["examples"], ed["examples_per_s"], None,
         ed["examples_per_s"] / ref["examples_per_s"], *mem("elrea_dense_projection")],
        ["plain training fwd+bwd (no features)", pl["examples"], pl["examples_per_s"], None, None,
         *mem("plain_fwd_bwd")],
    ]
    c = report["config"]
    C.print_table(
        f"Per-example gradient features: {c['model']}, {c['num_lora_params']:,} LoRA params -> {c['dim']}, "
        f"batch {c['batch_size']}",
        ["method", "examples", "examples/s", "grad-only ex/s", "x reference", "peak RSS MiB", "RSS growth MiB"],
        rows,
        [f"elrea speed-up over reference: {ra['speedup_vs_reference']:.1f}x (target >= {TARGET_SPEEDUP:g}x); "
         f"gradients alone: {ra['gradient_only_speedup']:.1f}x",
         f"dense projection: {ref['projection_share']:.0%} of the reference's time "
         f"({ref['projection_s']:.1f} s for {ref['examples']} examples)",
         f"elrea features / plain fwd+bwd: {ra['elrea_over_plain_fwd_bwd']:.2f} (target <= {TARGET_OVERHEAD:g}); "
         f"gradients alone: {ra['elrea_gradients_over_plain_fwd_bwd']:.2f}",
         f"agreement with the reference (same dense projection): cosine min {ag['projected_cosine_min']:.6f}, "
         f"mean {ag['projected_cosine_mean']:.6f} (need >= {COSINE_MIN}) -> {'ok' if ag['ok'] else 'FAILED'}",
         C.machine_note(report)])


def main(argv=None) -> dict:
    return C.run_benchmark("speed_features", parse_args, run, show, argv)


if __name__ == "__main__":
    main()
