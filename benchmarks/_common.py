"""Shared helpers for the benchmarks (speed_features.py and speed_generate.py run through run_benchmark).

Machine description, thread setup, median timing, sampled per-phase RSS, model/prompt loading
(the real alias or the tiny offline model of --quick), a rich table and the JSON report.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything here is local; never wait on the hub

try:  # an installed (or editable) elrea wins; the checkout's src only when it is not importable
    import elrea  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402


# ----------------------------------------------------------------------------- setup / machine

def add_common_args(ap, out_name: str):
    ap.add_argument("--model", default="smollm2-135m-instruct", help="backbone alias, hub id or directory")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...; default cpu)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny offline model and few examples (for tests; timings mean nothing)")
    ap.add_argument("--out", default=None,
                    help=f"JSON report (default benchmarks/results/{out_name}.json, "
                         f"or {out_name}_quick.json with --quick)")


def parse_data_args(ap, argv=None):
    """--seed, --quick and --out added to a benchmark that reads a --data file; parsed, with
    --data required unless --quick."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model and toy data (for tests)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.quick and not args.data:
        ap.error("give --data TRAIN.jsonl (or --quick)")
    return args


def training_data(args, prefix: str) -> str:
    """The training file of a benchmark parsed by parse_data_args, after --threads is applied:
    --data, or with --quick a toy file of 64 records, and args.model set to the tiny model."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if not args.quick:
        return args.data
    from elrea.testing import make_toy_records, write_jsonl

    args.model = tiny_model_dir()
    return str(write_jsonl(Path(tempfile.mkdtemp(prefix=prefix)) / "train.jsonl", make_toy_records(64, seed=0)))


def data_benchmark_main(script: str, parse_args, run, show, argv=None) -> dict:
    """The main() of a benchmark parsed by parse_data_args: parse, run, print the table, write
    benchmarks/results/<script's name>.json (<name>_quick.json with --quick) or --out."""
    args = parse_args(argv)
    report = {"command": command_line(sys.argv[0] if argv is None else script, argv), "machine": machine()}
    report.update(run(args))
    show(report)
    name = Path(script).stem
    write_report(Path(args.out) if args.out else RESULTS / f"{name}{'_quick' if args.quick else ''}.json", report)
    return report


def default_out(args, out_name: str) -> Path:
    if args.out:
        return Path(args.out)
    return RESULTS / (f"{out_name}_quick.json" if args.quick else f"{out_name}.json")


def setup(args):
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    import logging

    for name in ("transformers", "peft", "bitsandbytes"):   # load-time notices would garble the table
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def machine() -> dict:
    import peft
    import transformers

    cpu = platform.processor()
    try:  # platform.processor() is often empty on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
    }
    info.update(cpu_features())
    if torch.cuda.is_available():  # a run on a GPU names it, with the CUDA version
        g = gpu_info(torch.device("cuda", 0))
        info.update(gpu=g["name"], gpu_memory_gib=g["memory_gib"], cuda=torch.version.cuda)
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):  # a busy machine makes every number here wrong: record it
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def cpu_features() -> dict:
    """What torch's CPU kernels can use here: bf16 is fast only with AMX tiles (or, less so,
    AVX-512 bf16); CPUs of one name in a cloud differ in this, so every report records it."""
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for key, probe in (("cpu_amx", "_is_amx_tile_supported"), ("cpu_avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(torch.cpu, probe, None)   # private probes of torch >= 2.3: absent means unknown
        if fn is not None:
            info[key] = bool(fn())
    return info


def gpu_info(dev: torch.device) -> dict:
    """Name, memory (GiB) and compute capability of a CUDA device."""
    props = torch.cuda.get_device_properties(dev)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "capability": f"{props.major}.{props.minor}"}


def command_line(script: str, argv=None) -> str:
    """The exact command; for main(argv) called from Python, the equivalent command line."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in [sys.executable, script] + args)


# ----------------------------------------------------------------------------- timing / memory

def timed(fn, repeats: int = 1, warmup=None):
    """(median seconds, all times, last result); `warmup` (or fn itself) runs once untimed first."""
    (warmup or fn)()
    times, result = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, result


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2 ** 20 if sys.platform == "darwin" else kb / 2 ** 10   # bytes on macOS, KiB on Linux


@contextmanager
def rss_phase(record: dict, interval: float = 0.005):
    """Peak resident set while the block runs, and its growth over the start (MiB), in `record`:
    elrea.models.PeakMemory on the CPU (a sampling thread; ru_maxrss only gives the whole
    process's peak). A spike shorter than `interval` can be missed."""
    from elrea.models import PeakMemory

    gc.collect()
    m = PeakMemory("cpu", interval)
    try:
        with m:
            yield record
    finally:
        if m.start is not None:
            record["peak_rss_mb"] = round(m.peak / 2 ** 20, 1)
            record["rss_growth_mb"] = round((m.peak - m.start) / 2 ** 20, 1)


# ----------------------------------------------------------------------------- models / data

_TINY_DIRS: list[tempfile.TemporaryDirectory] = []


def tiny_model_dir() -> str:
    """A few-layer random Llama with its own tokenizer, in a temp dir kept for this process."""
    from elrea.testing import make_tiny_model, make_toy_records

    tmp = tempfile.TemporaryDirectory(prefix="elrea-bench-tiny-")
    _TINY_DIRS.append(tmp)
    texts = [r["instruction"] + " " + r["response"] for r in make_toy_records(400, seed=1)]
    return str(make_tiny_model(tmp.name, texts))


def load_model(args):
    """(backbone in eval mode with frozen weights, tokenizer, model name as reported)."""
    from elrea.config import ModelConfig
    from elrea.models import load_backbone, load_tokenizer

    name = tiny_model_dir() if args.quick else args.model
    cfg = ModelConfig(name=name, device=getattr(args, "device", "cpu"))
    return load_backbone(cfg), load_tokenizer(cfg), ("tiny (elrea.testing.make_tiny_model)" if args.quick else name)


def instructions(n: int, split: str, seed: int, quick: bool) -> tuple[list[str], str]:
    """`n` instructions from the built-in reasoning-mix (toy records with --quick), and their origin."""
    if quick:
        from elrea.testing import make_toy_records

        return [r["instruction"] for r in make_toy_records(n, seed=seed)], "toy (elrea.testing)"
    try:
        from elrea.tasks import make_split

        rows = make_split("reasoning-mix", split, n, seed=seed)
        return [r["instruction"] for r in rows], f"reasoning-mix/{split}"
    except Exception as e:  # noqa: BLE001 - reasoning-gym missing or broken: keep the benchmark running
        print(f"reasoning-mix unavailable ({type(e).__name__}: {e}); using synthetic prompts", file=sys.stderr)
        return synthetic_instructions(n, seed), "synthetic"


def synthetic_instructions(n: int, seed: int) -> list[str]:
    """Prompts shaped like reasoning-mix's (one short task + answer format, ~20-35 tokens)."""
    import random

    rng = random.Random(seed)
    words = "apple river stone cloud garden letter silver window orange forest candle bridge".split()
    forms = [
        lambda: f"Compute {rng.randint(10, 99)} + {rng.randint(10, 99)} - {rng.randint(10, 99)}. "
                "Answer with the number only.",
        lambda: f"Find the greatest common divisor (GCD) of {rng.randint(10, 99)} and {rng.randint(10, 99)}. "
                "Answer with the number only.",
        lambda: f"Spell the word \"{rng.choice(words)}\" backward. Answer with the reversed word only.",
        lambda: "Sort these words alphabetically: " + ", ".join(rng.sample(words, 5))
                + ". Answer with the words separated by commas.",
    ]
    return [forms[i % len(forms)]() for i in range(n)]


def randomize_lora_b(model, std: float, seed: int, adapter: str | None = None):
    """PEFT starts B at zero (so every LoRA gradient w.r.t. A is zero); give it random values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)   # the same values on any device
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n and (adapter is None or f".lora_B.{adapter}." in n):
                p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)


def random_experts_model(model: str, dtype: str, adapters: int, seed: int, device="cpu"):
    """(PEFT model in eval mode, its tokenizer, the adapter names): `model` with `adapters` LoRA
    adapters of the default config ("default", "expert_1", ...), every B random (std 0.02)."""
    from peft import get_peft_model

    from elrea.config import LoraConfig, ModelConfig
    from elrea.models import load_backbone, load_tokenizer, peft_lora_config

    lora = LoraConfig()
    names = ["default"] + [f"expert_{c}" for c in range(1, adapters)]
    mcfg = ModelConfig(name=model, dtype=dtype)
    torch.manual_seed(seed)
    m = get_peft_model(load_backbone(mcfg, device), peft_lora_config(lora))
    for a in names[1:]:
        m.add_adapter(a, peft_lora_config(lora))
    randomize_lora_b(m, 0.02, seed)
    return m.eval(), load_tokenizer(mcfg), names


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu"):
    """(input_ids, attention_mask) [n, T] on `device`, padded on the left for decoding (elrea's own)."""
    from elrea.ensemble import left_pad as pad

    return pad(seqs, pad_id, device)


def sync(device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- output

def print_table(title: str, columns: list[str], rows: list[list], notes: list[str] = ()):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    console = Console(width=None if sys.stdout.isatty() else 160)   # no wrapping in logs
    console.print(table)
    for n in notes:
        console.print(n)


def machine_note(report: dict) -> str:
    m = report["machine"]
    load = m.get("loadavg_at_start")
    return (f"{m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads"
            + (f", load average at start {load[0]:.2f}" if load else "")
            + f"\ncommand: {report['command']}")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_benchmark(name: str, parse_args, run, show, argv=None) -> dict:
    """A speed benchmark's main(): parse, set threads, run, print the table, write the JSON."""
    args = parse_args(argv)
    setup(args)
    script = str(Path(__file__).with_name(f"{name}.py"))
    report = {"command": command_line(sys.argv[0] if argv is None else script, argv),
              "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine()}
    report.update(run(args))
    show(report)
    write_report(default_out(args, name), report)
    return report


def write_report(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    report["machine"]["peak_rss_mb_process"] = round(peak_rss_mb(), 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
