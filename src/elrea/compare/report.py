"""What `elrea compare` shows: terminal tables, OUT/report.md and its pictures."""

from __future__ import annotations

import logging
from pathlib import Path

from ..rundir import atomic_path

log = logging.getLogger(__name__)


def _rows(report: dict) -> tuple[list[str], list[list]]:
    acc, vs, vl = report["accuracy"], report["versus_lora_matched"], report.get("versus_lora")
    sources = list(next(iter(acc.values()))["per_source"])
    rows = []
    for m, r in acc.items():
        rows.append([m] + [f"{100 * r['per_source'][s]:.1f}" for s in sources] + [f"{100 * r['mean']:.1f}",
                    _difference(vs.get(m))] + ([] if vl is None else [_difference(vl.get(m))]))
    cols = ["method"] + sources + ["mean", "vs lora-matched (95% CI)"]
    return cols + ([] if vl is None else ["vs lora (95% CI)"]), rows   # vs lora: reports since 2026-12-03


def _difference(d: dict | None) -> str:
    return "-" if d is None else f"{d['points']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"


def _routing_rows(report: dict) -> tuple[list[str], list[list]]:
    rc = report["routing_cost"]
    cols = ["router", "ms/prompt (batch 1)", "ms/prompt (batched)", "x one decoded token"]
    rows = [[r, f"{v['ms_per_prompt_batch1']:.1f}", f"{v['ms_per_prompt_batched']:.1f}",
             f"{v['ratio_to_one_token']:.2f}"] for r, v in rc["routers"].items()]
    return cols, rows


def _cluster_rows(report: dict) -> tuple[list[str], list[list]]:
    cols = ["run", "signal", "centred", "C", "sizes", "ARI", "NMI", "silhouette"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [[n, c["signal"], "yes" if c["centered"] else "no", c["num_clusters"], " ".join(map(str, c["sizes"])),
             f(c["ari"]), f(c["nmi"]), f(c["silhouette"])] for n, c in report["clusterings"].items()]
    return cols, rows


def _budget_rows(report: dict) -> tuple[list[str], list[list]]:
    cols = ["method", "optimizer steps", "tokens seen (M)", "test mean (%)", "s per test prompt"]
    b = report["budget"]["methods"]
    rows = [[m, v["steps"], _millions(v.get("tokens")), f"{100 * v['test_mean']:.1f}", f"{v['seconds_per_prompt']:.3f}"]
            for m, v in sorted(b.items(), key=lambda kv: (kv[1]["steps"], kv[0]))]
    return cols, rows


def _millions(n) -> str:
    """Tokens in millions ("-" for a report written before tokens were counted)."""
    return "-" if n is None else f"{n / 1e6:.3g}"


def _choice_rows(report: dict) -> tuple[list[str], list[list]]:
    cols = ["run", "router", "tau", "experts", "validation mean (%)"]
    rows = [[t["run"], t["router"], t["tau"], f"top-{t['top_k']}" if t["top_k"] else "all", f"{100 * t['validation']:.1f}"]
            for t in report["trials"]]
    return cols, rows


def show(report: dict) -> None:
    """Print the tables (rich)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if console_is_tty() else 200)
    n = report["data"]["examples"]
    held = [(f"accuracy on {name} (%), held out, {h['examples']} prompts", _rows(h))
            for name, h in report.get("held_out", {}).items()]
    for title, (cols, rows) in [
            (f"accuracy on test (%), {n['test']} prompts; checker: {report['checker']}", _rows(report)), *held,
            ("accuracy against training compute", _budget_rows(report)),
            ("routing cost", _routing_rows(report)),
            ("clusters against sources", _cluster_rows(report)),
            (f"chosen on validation ({n['validation']} prompts)", _choice_rows(report))]:
        t = Table(title=title)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*[escape(str(v)) for v in r])
        console.print(t)


def console_is_tty() -> bool:
    import sys

    return sys.stdout.isatty()


def _md_table(cols, rows) -> str:
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> Path:
    """OUT/report.md with the tables, and OUT/accuracy.png, OUT/per_source.png."""
    pictures = _pictures(out, report)
    e, n, d = report["elrea"], report["data"]["examples"], report["data"]
    text = [
        "# elrea compare", "",
        f"Training {n['train']} examples (`{d['train']}`), validation {n['validation']} "
        f"(`{d['validation']}`{', carved from the training data' if d['validation_carved'] else ''}), "
        f"test {n['test']} (`{d['test']}`). Answers checked by `{report['checker']}`. "
        f"Compute-matched LoRA: {report['compute_matched_steps']} optimizer steps (ELREA's base adapter + "
        f"all experts). Chosen on validation: run `{e['run']}`, router `{e['router']}`, tau {e['tau']}, "
        f"{'top-%d' % e['top_k'] if e['top_k'] else 'all experts'}.", "",
        "## Accuracy on test (%)", "",
        "Mean over sources; then the difference to the compute-matched LoRA (`lora-matched`) and to one "
        "LoRA at the config's epochs (`lora`, the paper's comparison) in points, each with a 95% paired "
        "bootstrap interval (test prompts resampled within each source).", "",
        _md_table(*_rows(report)), "",
    ]
    text += [f"![{p.stem}]({p.name})" for p in pictures if p.stem != "budget"] + [""]
    for name, h in report.get("held_out", {}).items():
        text += [f"## Accuracy on {name} (%), held out", "", f"{h['examples']} prompts (`{h['path']}`); same "
                 "methods, chosen on the same validation split; columns as above.", "", _md_table(*_rows(h)), ""]
    text += ["## Accuracy against training compute", "",
             "Optimizer steps of each method's adapters (base + experts), the non-padding tokens they trained on "
             "(Trainer's count; for adapters trained before elrea counted, each example's length times the epochs "
             "it ran), its test mean, and decoding seconds per test prompt (the cost at inference). `elrea-half` "
             "is the chosen ELREA setting refitted with base and experts at half their epochs, so that it meets "
             "`lora` at about equal steps, as ELREA meets `lora-matched`.", "",
             _md_table(*_budget_rows(report)), "", "![budget](budget.png)", "",
             "## Routing cost", "",
             f"One decoded token at batch 1: {report['routing_cost']['ms_per_decoded_token_batch1']:.1f} ms.", "",
             _md_table(*_routing_rows(report)), "",
             "## Clusters against sources", "", _md_table(*_cluster_rows(report)), "",
             "## Chosen on validation", "", _md_table(*_choice_rows(report)), "",
             "## Stage times (s)", "",
             _md_table(["run", "stage", "seconds"], [[r, s, v] for r, st in report["stage_seconds"].items()
                                                     for s, v in st.items()]), ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(text), encoding="utf-8")
    log.info("wrote %s", path)
    return path


def _pictures(out: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc, vs = report["accuracy"], report["versus_lora_matched"]
    methods = list(acc)
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods)), 4))
    means = [100 * acc[m]["mean"] for m in methods]
    ref = 100 * acc["lora-matched"]["mean"]
    err = np.array([[means[i] - (ref + vs[m]["ci95"][0]), (ref + vs[m]["ci95"][1]) - means[i]]
                    if m in vs else [0, 0] for i, m in enumerate(methods)]).T
    ax.bar(methods, means, yerr=err, capsize=3, color=["tab:orange" if m.startswith("elrea") else "tab:gray"
                                                         for m in methods])
    ax.axhline(ref, ls="--", lw=1, color="k")
    ax.set_ylabel("mean accuracy over sources (%)")
    ax.set_title("test accuracy; bars: 95% paired interval vs lora-matched (dashed)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    paths.append(_save(fig, out / "accuracy.png"))
    sources = list(acc[methods[0]]["per_source"])
    M = np.array([[100 * acc[m]["per_source"][s] for s in sources] for m in methods])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(sources) + 2), 0.4 * len(methods) + 1.5))
    im = ax.imshow(M, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sources)), sources, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(sources)):
            ax.text(j, i, f"{M[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    paths.append(_save(fig, out / "per_source.png"))
    paths.append(_budget_picture(out, report, plt))
    plt.close("all")
    return paths


def _budget_picture(out: Path, report: dict, plt) -> Path:
    b = report["budget"]
    axes = [("steps", "optimizer steps", "optimizer steps (base + experts)", 1)]
    if all(v.get("tokens") is not None for v in b["methods"].values()):
        axes.append(("tokens", "tokens seen", "tokens seen, millions (base + experts)", 1e-6))
    fig, panels = plt.subplots(1, len(axes) + 1, figsize=(5.5 * len(axes) + 4.5, 4),
                               gridspec_kw={"width_ratios": [3] * len(axes) + [2]})
    for ax, (key, what, label, scale) in zip(panels, axes):
        for (name, ms), color in zip(b["curves"].items(), ["tab:gray", "tab:orange"]):
            ms = [m for m in ms if m in b["methods"]]
            xs = [scale * b["methods"][m][key] for m in ms]
            ys = [100 * b["methods"][m]["test_mean"] for m in ms]
            ax.plot(xs, ys, "o-", color=color, label=name)
            for m, x, y in zip(ms, xs, ys):
                ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        others = [m for m in b["methods"] if not any(m in ms for ms in b["curves"].values())]
        ax.scatter([scale * b["methods"][m][key] for m in others], [100 * b["methods"][m]["test_mean"] for m in others],
                   s=12, color="tab:blue", alpha=0.6, label="other methods")
        ax.set_xlabel(label)
        ax.set_ylabel("test mean accuracy (%)")
        ax.set_title(f"accuracy against {what}")
        ax.legend(fontsize=8)
    bx = panels[-1]
    ms = list(b["methods"])
    bx.barh(ms, [b["methods"][m]["seconds_per_prompt"] for m in ms],
            color=["tab:orange" if m.startswith("elrea") else "tab:gray" for m in ms])
    bx.set_xlabel("decoding seconds per test prompt")
    bx.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, out / "budget.png")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
