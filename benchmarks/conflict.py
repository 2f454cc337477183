"""Do the sources' training gradients conflict? The premise ELREA needs, measured directly.

    python benchmarks/conflict.py                   # ~20 min on 2 CPU cores (640 examples)
    python benchmarks/conflict.py --train 320 --work /tmp/conflict

ELREA can only beat one adapter trained as long (the compute-matched base) if training on some
sources hurts others: gradients that point against each other (PCGrad's "conflict": a negative
cosine). At the base adapter, the point where ELREA's experts and the compute-matched base part
ways, this script computes every training example's exact gradient of its response loss (the
training loss, one batched backward per batch; elrea.features) and reports

  mean-gradient cosine   cos(G_s, G_t), G_s = mean gradient of source s (exact, all 2.4M LoRA
                         coordinates): below 0, a step on t raises s's loss to first order
  s vs the rest          cos(G_s, G_{not s}): does training on everything else help s?
  example pairs          cosines of per-example gradients (sparse JL projection to --dim, as
                         elrea's features): mean and share of negative pairs, within a source
                         and across sources
  routing space          cos of the sources' mean instruction-only features (what ELREA
                         clusters and routes on), for comparison

Writes benchmarks/results/conflict.json and conflict.png (the two source x source matrices).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table  # noqa: E402

from elrea.config import load_config  # noqa: E402
from elrea.data import PromptFormatter, collate, load_records  # noqa: E402
from elrea.demo import demo_config_path  # noqa: E402
from elrea.features import iter_per_example_gradients, num_lora_params  # noqa: E402
from elrea.models import load_backbone, load_tokenizer  # noqa: E402
from elrea.pipeline import fit  # noqa: E402
from elrea.projection import make_projector  # noqa: E402
from elrea.rundir import Run, atomic_path, load_features  # noqa: E402
from elrea.tasks import export_mixture  # noqa: E402

log = logging.getLogger("conflict")


def training_gradients(model, encoded, source_ids: np.ndarray, k: int, pad_id: int, batch_size: int,
                       projector) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-source gradient sums [k, p], projected per-example gradients [n, d]) of the training loss.

    The per-example gradient is that of the example's mean response-token loss (elrea.features),
    so G_s = sums[s] / n_s is the gradient of source s's mean example loss.
    """
    from tqdm.auto import tqdm

    n, p = len(encoded), num_lora_params(model)
    sums = torch.zeros(k, p)                               # (k, p): exact, no projection
    proj = torch.zeros(n, projector.dim)                   # (n, d)
    for s in tqdm(range(0, n, batch_size), desc="training gradients", unit="batch"):
        batch = collate(encoded[s:s + batch_size], pad_id, side="right")
        rows = torch.as_tensor(source_ids[s:s + batch_size])
        out = torch.zeros(len(rows), projector.dim)
        for _, offset, g in iter_per_example_gradients(model, batch):   # g: (b, numel)
            sums[:, offset:offset + g.shape[1]].index_add_(0, rows, g)
            projector.project_block(g, offset, out)
        proj[s:s + len(rows)] = out
    return sums, proj


def cosine_matrix(A: torch.Tensor, B: torch.Tensor | None = None) -> np.ndarray:
    A = F.normalize(A.double(), dim=1)
    B = A if B is None else F.normalize(B.double(), dim=1)
    return (A @ B.T).numpy()


def pair_stats(unit: torch.Tensor, source_ids: np.ndarray) -> dict:
    """Mean cosine and share of negative cosines of example pairs, within and across sources."""
    cos = (unit @ unit.T).numpy()                          # (n, n)
    same = source_ids[:, None] == source_ids[None, :]
    off_diag = ~np.eye(len(cos), dtype=bool)
    out = {}
    for name, m in (("within_source", same & off_diag), ("across_sources", ~same)):
        v = cos[m]
        out[name] = {"pairs": int(m.sum() // 2), "mean_cosine": float(v.mean()),
                     "negative_share": float((v < 0).mean())}
    return out


def source_means(X, source_ids: np.ndarray, k: int) -> torch.Tensor:
    X = torch.as_tensor(np.asarray(X[:]), dtype=torch.float64)
    return torch.stack([X[torch.as_tensor(source_ids == s)].mean(0) for s in range(k)])


def plot(matrices: dict[str, np.ndarray], names: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(7.2 * len(matrices), 6))
    for ax, (title, M) in zip(np.atleast_1d(axes), matrices.items()):
        im = ax.imshow(M, cmap="RdBu", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(M[i, j]) > 0.6 else "black")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixture", default="reasoning-mix", help="built-in mixture (elrea data export)")
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=8192, help="projection of the per-example gradients")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", default="benchmarks/work/conflict", help="run directory (resumable)")
    ap.add_argument("--out", default=str(RESULTS / "conflict.json"))
    ap.add_argument("overrides", nargs="*", help="config overrides on top of the demo config")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    work, out = Path(args.work), Path(args.out)
    cfg = load_config(demo_config_path(), args.overrides)

    # 1. the base adapter and the instruction-only features, exactly as `elrea fit` makes them
    paths = export_mixture(args.mixture, work / "data", train=args.train, validation=0, test=0, seed=args.seed)
    run = work / "run"
    t0 = time.time()
    fit(paths["train"], run, cfg, until="features")
    records = load_records(paths["train"])
    names = sorted({str(r.source) for r in records})
    source_ids = np.array([names.index(str(r.source)) for r in records])
    k = len(names)

    # 2. exact per-example training gradients at the base adapter (dropout off)
    from peft import PeftModel

    tok = load_tokenizer(cfg.model)
    fmt = PromptFormatter(tok, cfg.data.system_prompt, cfg.data.max_length, cfg.data.truncation)
    model = PeftModel.from_pretrained(load_backbone(cfg.model), str(Run(run).base), is_trainable=True).eval()
    projector = make_projector("sjlt", num_lora_params(model), args.dim, cfg.stage_seed("projection"))
    t1 = time.time()
    sums, proj = training_gradients(model, [fmt.encode_train(r) for r in records], source_ids, k,
                                    tok.pad_token_id, args.batch_size, projector)
    grad_s = round(time.time() - t1, 1)
    counts = torch.as_tensor(np.bincount(source_ids, minlength=k), dtype=torch.float64)[:, None]
    G = sums.double() / counts                                     # (k, p) mean gradient per source
    rest = (sums.double().sum(0, keepdim=True) - sums.double()) / (len(records) - counts)
    grad_cos = cosine_matrix(G)
    vs_rest = np.diag(cosine_matrix(G, rest))
    feat_cos = cosine_matrix(source_means(load_features(Run(run).features), source_ids, k))

    pairs = pair_stats(F.normalize(proj, dim=1), source_ids)
    off = ~np.eye(k, dtype=bool)
    report = {
        "command": command_line(__file__, argv), "machine": machine(),
        "data": {"mixture": args.mixture, "train": len(records), "seed": args.seed},
        "config": cfg.to_dict(), "sources": names, "examples_per_source": counts.squeeze(1).tolist(),
        "mean_gradient_cosine": grad_cos.tolist(), "source_vs_rest_cosine": dict(zip(names, vs_rest.tolist())),
        "negative_source_pairs": int((grad_cos[off] < 0).sum() // 2), "source_pairs": int(off.sum() // 2),
        "min_cross_source_cosine": float(grad_cos[off].min()), "example_pairs": pairs,
        "instruction_feature_cosine": feat_cos.tolist(),
        "grad_norm_per_source": dict(zip(names, G.norm(dim=1).tolist())),
        "seconds": {"fit_base_and_features": round(t1 - t0, 1), "training_gradients": grad_s},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    png = plot({"training gradients at the base adapter: cos(G_s, G_t)": grad_cos,
                "instruction-only features (routing space): cos of source means": feat_cos},
               names, out.with_suffix(".png"))

    short = [n[:12] for n in names]
    print_table("cosine of mean training gradients, source x source", ["source"] + short,
                [[n] + list(row) for n, row in zip(names, grad_cos)])
    print_table("each source against the rest", ["source", "examples", "cos(G_s, G_rest)", "|G_s|"],
                [[n, int(c), v, g] for n, c, v, g in zip(names, counts.squeeze(1).tolist(), vs_rest,
                                                         G.norm(dim=1).tolist())])
    print_table("per-example gradient pairs", ["pairs", "count", "mean cosine", "negative (%)"],
                [[key, v["pairs"], v["mean_cosine"], 100 * v["negative_share"]] for key, v in pairs.items()])
    print(f"negative source pairs: {report['negative_source_pairs']} of {report['source_pairs']}; "
          f"smallest cross-source cosine {report['min_cross_source_cosine']:.3f}")
    print(f"wrote {out} and {png}")
    return report


if __name__ == "__main__":
    main()
