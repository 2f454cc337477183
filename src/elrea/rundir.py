"""The run directory: atomic files, the manifest, and the streamed feature store.

Layout (docs/method.md, "Run directory"):
    elrea.json                 manifest: backbone, resolved config, versions, stage status
    run_config.json            the resolved config (config.json before 0.2: still read)
    README.md                  model card
    base/                      PEFT adapter folder (+ adam_moments.safetensors)
    features/train.npy         [N, d] float32 (+ train.progress/, one record per process's shard)
    clusters/clusters.json     assignments, sizes, source mix; clusters/centroids.safetensors
                               (+ the mean training feature when features.center)
    experts/<c>/               PEFT adapter folders, c = 1..C
    router/                    learned router (learned.safetensors + learned.json) and the
                               embedding router's cluster means (embedding.safetensors)
    logs/<stage>/              Trainer logs (TensorBoard when report_to asks for it)
    .elrea.lock, .elrea.lock.json   the writer's OS file lock and who holds it (RunLock)

`Run` is this layout as code: every module that reads or writes a run goes through it.

Every file is written to a temporary name and renamed into place, so a killed job leaves
either the old file or the new one, never half of one; a full disk is an `OutOfSpace` error
naming the path, with nothing half-written committed. Only JSON, safetensors and .npy (loaded
with allow_pickle=False) are ever read back. One process at a time writes a run directory
(`RunLock`); readers refuse a run whose stages are being rewritten (`check_readable`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import OutOfSpace, RunDirError, RunInUse
from .stages import INFERENCE_STAGES

if TYPE_CHECKING:
    from .config import RunConfig

log = logging.getLogger(__name__)
MANIFEST = "elrea.json"
RUN_CONFIG = "run_config.json"      # not config.json: transformers tooling reads that as a model config
LEGACY_RUN_CONFIG = "config.json"
LOCK = ".elrea.lock"
LOCK_INFO = ".elrea.lock.json"


def run_config_path(run_dir: str | Path) -> Path:
    """The run's resolved config: run_config.json, or config.json in runs made before it."""
    run_dir = Path(run_dir)
    new = run_dir / RUN_CONFIG
    return new if new.exists() or not (run_dir / LEGACY_RUN_CONFIG).exists() else run_dir / LEGACY_RUN_CONFIG


@contextmanager
def atomic_path(path: str | Path, is_dir: bool = False):
    """Yield a temporary path beside `path`; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
        tmp = Path(name)
    try:
        with out_of_space(path):
            yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp make it private
        if is_dir:  # and what writers put inside (safetensors' files are 0600) as readable as the rest
            for inner in tmp.rglob("*"):
                os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~umask)
        if is_dir and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if is_dir else tmp.unlink(missing_ok=True)
        raise


@contextmanager
def out_of_space(path: str | Path):
    """Turn a full disk (ENOSPC, EDQUOT, or safetensors' wrapped form of them) while writing
    `path` into an OutOfSpace error that names it."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutOfSpace(path) from None
    except Exception as e:  # safetensors reports I/O errors as SafetensorError("... StorageFull ...")
        if "StorageFull" not in str(e) and "No space left" not in str(e):
            raise
        raise OutOfSpace(path) from None


def make_dir(path: str | Path, what: str = "directory") -> Path:
    """mkdir -p `path`, or a RunDirError naming it (a file in the way, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: a file, not a {what}; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{path}: cannot create the {what} ({e.strerror or e}); choose another path") from None
    return path


def sha256_file(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, "\\n" line ends) to `path` atomically, on disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> dict:
    """A JSON object that elrea wrote (every JSON file of a run is one); anything else, missing,
    corrupt or of another shape, is a RunDirError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: missing; re-run `elrea fit` to recreate it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise RunDirError(f"{path}: truncated or corrupt JSON ({e}); re-run `elrea fit`") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}: damaged or not elrea's; "
                          "re-run `elrea fit`")
    return data


class Run:
    """The run directory as an object: the only code that names the files in it (the layout in
    this module's docstring), reads its resolved config, and says what a shippable run holds."""

    # What a run ships, each pattern (fnmatch on the path in the run; the first that matches
    # decides) with why: "inference" (loading and running the run reads it), "card" (the card,
    # report.md and its pictures: aggregate figures only), "on request" (eval.json holds every
    # test prompt, reference and output, i.e. the user's test set: only with `elrea push
    # --include-eval` or `save_pretrained(include_eval=True)`), "adam" (the base optimizer's
    # moments, twice the adapter: routing reads them only when features.test_preconditioner is
    # adam), "template" (PEFT's empty README of each adapter folder: never written out; the run's
    # card describes the adapters). `save_pretrained` and `elrea push` write what `shipped`
    # selects (elrea.card); loading a hub id downloads every pattern the repository has (runs
    # pushed before kept the moments and templates, and their manifests record them). Never the
    # training data, the features, the logs or the checkpoints.
    SHIPPED = {"README.md": "card", MANIFEST: "inference", RUN_CONFIG: "inference", "report.md": "card",
               "report/*.png": "card", "base/adam_moments.safetensors": "adam", "base/README.md": "template",
               "experts/*/README.md": "template", "base/*": "inference", "clusters/*": "inference",
               "experts/*/*": "inference", "router/*": "inference", "eval.json": "on request"}

    def __init__(self, root: "str | Path | Run"):
        self.root = Path(root.root if isinstance(root, Run) else root)

    def __truediv__(self, name) -> Path:
        return self.root / name

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def config_path(self) -> Path:
        """The resolved config: run_config.json, or config.json in runs made before it."""
        return run_config_path(self.root)

    @property
    def new_config_path(self) -> Path:
        """Where the resolved config is written (config.json of older runs is then removed)."""
        return self.root / RUN_CONFIG

    def config(self):
        """The run's resolved, validated RunConfig."""
        from .config import RunConfig
        from .errors import ConfigError

        try:
            return RunConfig.from_dict(read_json(self.config_path)).validate()
        except ConfigError as e:
            raise RunDirError(f"{self.config_path}: {e}; the run's config was changed or damaged: restore it (the "
                              f"resolved config is also under \"config\" in {MANIFEST})") from None

    def write_config(self, data: dict) -> None:
        """Save the resolved config (as run_config.json; an older run's config.json goes)."""
        write_json(self.new_config_path, data)
        (self.root / LEGACY_RUN_CONFIG).unlink(missing_ok=True)

    def config_dict(self) -> dict:
        """The resolved config as plain data (every field, under today's names), for tables and the card."""
        return self.config().to_dict()

    @property
    def base(self) -> Path:
        return self.stage_dir("base")

    @property
    def features(self) -> Path:
        return self.stage_dir("features") / "train.npy"

    @property
    def clusters(self) -> Path:
        return self.stage_dir("clusters")

    @property
    def clusters_json(self) -> Path:
        return self.clusters / "clusters.json"

    @property
    def centroids(self) -> Path:
        return self.clusters / "centroids.safetensors"

    @property
    def experts(self) -> Path:
        return self.stage_dir("experts")

    def expert(self, c: int) -> Path:
        return self.experts / str(c)

    @property
    def router(self) -> Path:
        """The routers' folder; each router plugin names its own files in it."""
        return self.stage_dir("router")

    def logs(self, name: str) -> Path:
        return self.root / "logs" / name

    def checkpoints(self, name: str) -> Path:
        """Where training stage `name` ("base", "expert-3") keeps its resumable Trainer
        checkpoints while it runs; removed once its adapter is saved."""
        return self.root / "checkpoints" / name

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def picture(self, name: str) -> Path:
        """A picture of the report (report/<name>)."""
        return self.root / "report" / name

    def file_hashes(self, stage: str) -> dict[str, str]:
        """{path relative to the run: SHA-256} of every file a stage wrote (its folder)."""
        folder = self.stage_dir(stage)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        return {f.relative_to(self.root).as_posix(): sha256_file(f) for f in files}

    def damaged(self, recorded: dict | None) -> list[str]:
        """The files of `recorded` ({path: SHA-256}, as file_hashes wrote it) that are missing or
        whose contents changed since; [] when nothing was recorded."""
        return [rel for rel, digest in (recorded or {}).items()
                if not (self.root / rel).is_file() or sha256_file(self.root / rel) != digest]

    def verify(self, stages: dict, names) -> None:
        """Refuse (RunDirError naming the file) a run whose files of the stages `names` are missing
        or were changed after their stage recorded them in `stages` (the manifest's): damage, a
        partial copy."""
        for stage in names:
            bad = self.damaged(stages.get(stage, {}).get("files"))
            if bad:
                raise RunDirError(f"{self.root / bad[0]}: missing or changed since `elrea fit` wrote it"
                                  f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; re-run the `elrea fit` "
                                  f"that made {self.root} (same data and settings): it rebuilds what is damaged")

    @classmethod
    def ships_as(cls, rel: str) -> str | None:
        """Why the file at `rel` (a path in the run) ships: its SHIPPED role, or None."""
        from fnmatch import fnmatchcase

        return next((role for pat, role in cls.SHIPPED.items() if fnmatchcase(rel, pat)), None)

    def shipped(self, include_eval: bool = False) -> list[str]:
        """The files this run ships, relative to the run directory, sorted: what inference and the
        card need (the base optimizer's moments when routing reads them), and eval.json when
        `include_eval`."""
        wanted = {"inference", "card"} | ({"on request"} if include_eval else set())
        if self.config_dict()["features"]["test_preconditioner"] == "adam":
            wanted.add("adam")
        files = {p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts)}
        return sorted(rel for rel in files if self.ships_as(rel) in wanted)

    def copy_shipped(self, out: "str | Path", include_eval: bool = False) -> list[str]:
        """Copy the shipped files (`shipped`) into the (new, empty) directory `out`, the config
        under its current name whatever name this run keeps it under; returns what was copied."""
        out = Path(out)
        files = self.shipped(include_eval)
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / rel, out / rel)
        if not (out / RUN_CONFIG).exists() and self.config_path.exists():
            shutil.copy2(self.config_path, out / RUN_CONFIG)
            files = sorted({*files, RUN_CONFIG})
        return files

    def labels(self) -> np.ndarray:
        """Cluster labels (1..C) of the training examples."""
        return np.asarray(read_json(self.clusters_json)["labels"], dtype=np.int64)

    def stage_dir(self, stage: str) -> Path:
        """The folder a stage writes: the one named after it (base/, features/, clusters/, ...)."""
        return self.root / stage

    def check_loadable(self, verify: bool = True) -> tuple["Manifest", "RunConfig"]:
        """Refuse (RunDirError naming the file and the command that fixes it) a run that cannot be
        loaded for inference as it stands: not a finished run, a stage being rewritten or left
        half-done, files from another fit, a config that names another backbone than the fit's,
        and with `verify` any inference file changed since it was recorded (SHA-256). None of it
        needs torch, so the CLI refuses a damaged run in a second, before the libraries load.
        Returns (manifest, config)."""
        manifest = Manifest.load(self.root)
        check_readable(self.root, manifest)  # no stage being rewritten or left half-done
        self.check_consistent(manifest)
        if verify:
            self.verify(manifest.data.get("stages", {}), INFERENCE_STAGES)
        config = self.config()
        recorded = manifest.data.get("backbone")
        if recorded and recorded != config.model.name:
            raise RunDirError(f"{self.config_path}: names the backbone {config.model.name!r}, but the run was fitted "
                              f"on {recorded!r} ({self.manifest}); the config file was changed or replaced: restore "
                              f"it (the resolved config is also under \"config\" in {self.manifest.name})")
        return manifest, config

    def check_consistent(self, manifest: "Manifest") -> None:
        """Every inference file comes from the fit the manifest records: the adapters' training
        summaries and clusters.json carry their stage's fingerprint (files from before the
        fingerprints were written are taken as they are)."""
        want = {s: manifest.stage(s).get("fingerprint") for s in INFERENCE_STAGES}
        files = [("base", self.base / "training.json"), ("clusters", self.clusters_json)]
        if self.clusters_json.exists():
            C = int(read_json(self.clusters_json).get("num_clusters", 0))
            files += [("experts", self.expert(c) / "training.json") for c in range(1, C + 1)]
        for stage, path in files:
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # missing or damaged files are the loaders' clear errors
            if not isinstance(found, dict):
                raise RunDirError(f"{path}: expected a JSON object, got {type(found).__name__}: damaged or not "
                                  f"elrea's; re-run `elrea fit --from {stage}` to rebuild it")
            found = found.get("fingerprint")
            if found is not None and want[stage] is not None and found != want[stage]:
                raise RunDirError(f"{path.parent}: written by another fit than the one {MANIFEST} records "
                                  f"(stage {stage!r}); re-run `elrea fit --from {stage}` to rebuild it")

    def share(self, source: "Run | str | Path", stages) -> "Run":
        """Copy finished `stages` (their folders and manifest entries) of `source` into this run, so
        that `fit` with the same settings skips them: baselines that share the base adapter and
        features with another run. Stages already done here are left as they are."""
        source = Run(source)
        theirs = Manifest.load(source.root)
        mine = Manifest.load(self.root, create=True)
        for stage in stages:
            st = theirs.stage(stage)
            if st.get("status") != "done":
                raise RunDirError(f"{source.root}: stage {stage!r} is not finished; nothing to share")
            if mine.stage(stage).get("fingerprint") == st.get("fingerprint") and mine.stage(stage).get("status") == "done":
                continue
            if source.stage_dir(stage).exists():
                with atomic_path(self.stage_dir(stage), is_dir=True) as tmp:
                    shutil.rmtree(tmp)
                    shutil.copytree(source.stage_dir(stage), tmp)
            mine.data.setdefault("stages", {})[stage] = dict(st)
            mine.save()
        return self


class Manifest:
    """elrea.json: what a run is, and which stages are done with which input fingerprints."""

    def __init__(self, root: Path, data: dict):
        self.root, self.data = root, data
        self.writable = True  # False on the non-main processes of a distributed run

    @classmethod
    def load(cls, root: str | Path, create: bool = False) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            if create:
                return cls(root, {"format": 1, "stages": {}})
            raise RunDirError(f"{root}: not an elrea run directory (no {MANIFEST}); run `elrea fit` first")
        data = read_json(path)
        if not isinstance(data.get("stages", {}), dict) or not all(
                isinstance(v, dict) for v in data.get("stages", {}).values()):
            raise RunDirError(f"{path}: its \"stages\" are not elrea's (damaged); re-run `elrea fit`")
        return cls(root, data)

    def save(self) -> None:
        if self.writable:
            write_json(self.root / MANIFEST, self.data)

    def stage(self, name: str) -> dict:
        return self.data.setdefault("stages", {}).get(name, {})

    def is_done(self, name: str, fingerprint: str) -> bool:
        st = self.stage(name)
        return st.get("status") == "done" and st.get("fingerprint") == fingerprint

    def mark(self, name: str, status: str, fingerprint: str, **info) -> None:
        self.data.setdefault("stages", {})[name] = {
            "status": status, "fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info}
        self.save()


class RunLock:
    """One writer per directory: an OS file lock (filelock: flock on POSIX, msvcrt on Windows) on
    DIR/.elrea.lock, and DIR/.elrea.lock.json saying who holds it.

        with RunLock(out, "elrea fit"):
            ...                       # a second writer refuses at once, naming the holder

    The OS drops the lock when its process dies, however it dies, so a killed writer's lock is
    free at once; the next writer finds the dead holder's note, says it takes over, and resumes.
    Only the main process of a distributed job locks (the others write their own shards).
    """

    def __init__(self, root: str | Path, command: str | None = None, wait_s: float = 1.0):
        self.root = Path(root)
        self.command = command or invocation() or "elrea (from Python)"
        self.wait_s = wait_s  # a reader's brief probe (is_locked) never makes a writer refuse
        self._lock = None

    @property
    def info_path(self) -> Path:
        return self.root / LOCK_INFO

    def holder(self) -> dict | None:
        try:
            return json.loads(self.info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        from filelock import FileLock, Timeout

        make_dir(self.root)
        for name in (LOCK, LOCK_INFO):
            if (self.root / name).is_dir():
                raise RunDirError(f"{self.root / name}: a directory where elrea keeps its lock file; remove it "
                                  f"(rm -r {self.root / name}) when no elrea command is using {self.root}")
        lock = FileLock(str(self.root / LOCK), timeout=self.wait_s)
        try:
            lock.acquire()
        except Timeout:
            raise RunInUse(f"{self.root}: in use by {describe_holder(self.holder())}; two writers would "
                           "mix their files. Wait for it to finish, or stop it (a stopped run resumes "
                           "where it was)") from None
        self._lock = lock
        stale = self.holder()
        if stale is not None:
            log.warning("%s: taking over from %s, which stopped without finishing; resuming its work",
                        self.root, describe_holder(stale))
        try:
            write_json(self.info_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": self.command})
        except BaseException:
            lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.info_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None


def invocation() -> str:
    """This process's command line as the user would type it again (`elrea fit ...`, `elrea demo ...`);
    "" in an interactive or `python -c` session, which no command repeats."""
    if Path(sys.argv[0]).name in ("-c", ""):
        return ""
    return shlex.join([_program(), *sys.argv[1:]])


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "elrea" if name in ("elrea", "cli.py", "__main__.py", "-c", "") else name


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process"
    return (f"`{info.get('command', 'elrea')}` (pid {info.get('pid')} on {info.get('host')}, "
            f"started {info.get('started')})")


def is_locked(root: str | Path) -> bool:
    """Is a writer holding `root`'s lock now? (A non-blocking probe; nothing is kept.)"""
    from filelock import FileLock, Timeout

    path = Path(root) / LOCK
    if not path.exists():
        return False
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a read-only run directory: nobody can be writing it
        return False
    lock.release()
    return False


def resume_hint(manifest: Manifest) -> str:
    """How to finish an interrupted run: the command that made it, recorded by its last fit."""
    command = manifest.data.get("command")
    return (f"re-run `{command}` (the same command resumes it)" if command else
            "re-run the `elrea fit` that made this run (the same command resumes it)")


def stage_status(root: str | Path, manifest: Manifest, stage: str) -> str:
    """A stage's status as a user should read it: a stage marked running whose writer is gone (no
    one holds the run's lock) was interrupted, not running."""
    status = manifest.stage(stage).get("status", "-")
    return "interrupted" if status == "running" and not is_locked(root) else status


def check_readable(root: str | Path, manifest: Manifest, stages=INFERENCE_STAGES) -> None:
    """Refuse to load a run whose `stages` are being rewritten or were left half-done (their
    files could come from two different fits)."""
    root = Path(root)
    for stage in stages:
        status = manifest.stage(stage).get("status")
        if status == "done":
            continue
        if is_locked(root):
            raise RunInUse(f"{root}: stage {stage!r} is being written by "
                           f"{describe_holder(RunLock(root).holder())}; wait for it to finish")
        if status == "running":
            raise RunDirError(f"{root}: stage {stage!r} was interrupted before it finished; {resume_hint(manifest)}")
        raise RunDirError(f"{root}: stage {stage!r} is not finished; run `elrea fit` to complete it")


class FeatureStore:
    """An [N, d] float32 .npy file filled by one or more processes, each over its own rows.

    Every process writes its contiguous shard of rows with positioned writes (no memory map, so
    resident memory stays at one batch however large the file), fsyncs them, and only then
    advances its shard's progress record in `<name>.progress/` (one small JSON per shard,
    written atomically). After a crash every row below a record's `done` is complete; a re-run
    resumes each shard after the rows that any record covers, whatever the number of processes.

        store = FeatureStore(path, n, d, fingerprint)
        store.prepare()                     # main process, before the others open it
        shard = store.shard(start, end)     # every process; shard.done = where to resume
        shard.write(row, rows); shard.commit(done); shard.close()
        store.complete()                    # every row covered?
    """

    def __init__(self, path: str | Path, n: int, dim: int, fingerprint: str):
        self.path = Path(path)
        self.progress_dir = self.path.with_suffix(".progress")
        self.n, self.dim, self.fingerprint = n, dim, fingerprint

    def prepare(self) -> None:
        """Keep a resumable file, or start a fresh one (dropping stale progress). Main process only."""
        self.path.with_suffix(".progress.json").unlink(missing_ok=True)  # single-record layout (<= 0.1)
        if self.path.exists() and self._records():
            return
        self.reset()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.n, self.dim))
        del header  # only wanted the .npy header and the (sparse) allocation
        self.progress_dir.mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        """Forget all progress (the next prepare() starts over)."""
        shutil.rmtree(self.progress_dir, ignore_errors=True)
        self.path.with_suffix(".progress.json").unlink(missing_ok=True)

    def _records(self) -> list[dict]:
        """Progress records that belong to this fingerprint and shape."""
        out = []
        for f in sorted(self.progress_dir.glob("rows-*.json")) if self.progress_dir.is_dir() else []:
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                continue  # a record is written atomically; anything else is not ours
            if rec.get("fingerprint") == self.fingerprint and rec.get("shape") == [self.n, self.dim]:
                out.append(rec)
        return out

    def covered(self) -> list[tuple[int, int]]:
        """Merged intervals [start, done) of complete rows."""
        spans = sorted((int(r["start"]), int(r["done"])) for r in self._records() if r["done"] > r["start"])
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged

    def rows_done(self) -> int:
        return sum(e - s for s, e in self.covered())

    def complete(self) -> bool:
        return self.covered() == [(0, self.n)] or self.n == 0

    def shard(self, start: int, end: int) -> "FeatureShard":
        """Open rows [start, end) for writing; its `done` is the first row not yet covered."""
        if not self.path.exists():
            raise RunDirError(f"{self.path}: feature store missing; the main process prepares it first")
        done = start
        for s, e in self.covered():
            if s <= done < e:
                done = min(e, end)
        return FeatureShard(self, start, end, done)


class FeatureShard:
    """One process's rows [start, end) of a FeatureStore, with its own durable progress record."""

    def __init__(self, store: FeatureStore, start: int, end: int, done: int):
        self.store, self.start, self.end, self.done = store, start, end, done
        self.record = store.progress_dir / f"rows-{start:010d}-{end:010d}.json"
        self.offset = FeatureFile(store.path, check_size=False).offset
        self.fd = os.open(store.path, os.O_RDWR)
        self._save()

    def write(self, start: int, rows: np.ndarray) -> None:
        if not (self.start <= start and start + len(rows) <= self.end):
            raise ValueError(f"rows {start}..{start + len(rows)} are outside shard {self.start}..{self.end}")
        data = memoryview(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        at = self.offset + start * self.store.dim * 4
        with out_of_space(self.store.path):  # rows past the recorded count are redone on resume
            while data:                      # a nearly full disk writes part and says so on the next try
                n = os.pwrite(self.fd, data, at)
                data, at = data[n:], at + n

    def commit(self, done: int) -> None:
        """Make rows [start, done) durable, then record the count."""
        with out_of_space(self.store.path):
            os.fsync(self.fd)
        self.done = done
        self._save()

    def _save(self):
        write_json(self.record, {"fingerprint": self.store.fingerprint, "shape": [self.store.n, self.store.dim],
                                 "start": self.start, "end": self.end, "done": self.done,
                                 "pid": os.getpid(), "host": socket.gethostname()})

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class FeatureFile:
    """Read-only rows of a feature .npy, mapped only for the duration of each read.

    Indexing with a slice or an index array returns an in-memory copy, so that streaming over
    a feature file larger than memory keeps resident memory at one chunk (a long-lived memmap
    would keep every page it touched resident).
    """

    def __init__(self, path: Path, check_size: bool = True):
        self.path = path
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or len(shape) != 2 or dtype != np.float32:
            raise RunDirError(f"{path}: expected a C-ordered [N, d] float32 array, got {dtype} {shape}")
        expected = self.offset + shape[0] * shape[1] * 4
        if check_size and path.stat().st_size < expected:
            raise RunDirError(f"{path}: truncated ({path.stat().st_size} of {expected} bytes); "
                              "re-run `elrea fit --from features`")
        self.shape = shape

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        mm = np.memmap(self.path, dtype=np.float32, mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mm[key])
        finally:
            del mm


def load_features(path: str | Path) -> FeatureFile:
    """Open a finished feature array for chunked reading (never unpickles)."""
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: feature store missing; re-run `elrea fit --from features`")
    try:
        return FeatureFile(path)
    except (ValueError, OSError) as e:
        raise RunDirError(f"{path}: truncated or corrupt feature store ({e}); "
                          "re-run `elrea fit --from features`") from None
