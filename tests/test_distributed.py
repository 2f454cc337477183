"""Scale-out: `elrea fit`, `eval` and `generate` as real processes under `accelerate launch`.

Two CPU processes with the gloo backend. accelerate 1.x starts several CPU processes only
through its torchrun launcher (`--multi_gpu`; `--cpu --num_processes 2` starts one process
unless MPI is configured, accelerate issue #2741); elrea then sets the processes up on the
CPU (gloo) because the machine has no GPU.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST
from elrea.testing import make_toy_records, write_jsonl

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# identical features need identical batches and kernels: 1 thread in every process
ARGS = [*FAST, "clustering.num_clusters=3", "base.max_steps=3", "experts.max_steps=2",
        "features.batch_size=1", "features.checkpoint_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(*args):
    return [sys.executable, "-m", "elrea.cli", *map(str, args)]


def _launch(*args):
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "-m", "elrea.cli", *map(str, args)]


def _run(cmd, ok=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    if ok and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _fit(run, model, data, *extra):
    return ["fit", "--model", model, "--data", data, "--out", run, *ARGS, *extra]


def _shard_records(run):
    out = []
    for f in (run / "features" / "train.progress").glob("rows-*.json"):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    return out


def _kill_second_rank_mid_features(cmd, run, timeout=300):
    """Start cmd; SIGKILL the process computing the second shard of features once it has
    committed a few rows. Returns the launcher's CompletedProcess-like (returncode, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0, killed = time.time(), None
    while time.time() - t0 < timeout and proc.poll() is None:
        second = [r for r in _shard_records(run) if r.get("start", 0) > 0]
        if second and 10 <= second[0]["done"] - second[0]["start"] < second[0]["end"] - second[0]["start"]:
            killed = dict(second[0])
            os.kill(second[0]["pid"], signal.SIGKILL)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=timeout)
    assert killed, f"the second process was never caught mid-features:\n{err[-3000:]}"
    return proc.returncode, err, killed


@pytest.mark.slow
def test_two_processes_give_what_one_gives(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(240, seed=5))
    test = write_jsonl(tmp_path / "test.jsonl", make_toy_records(20, seed=8))
    one, two = tmp_path / "one", tmp_path / "two"
    # one base adapter for both (data-parallel training is not bitwise one-process training)
    _run(_single(*_fit(one, tiny_model_dir, data, "--until", "base")))
    shutil.copytree(one, two)

    # 2 processes, the second killed mid-features: the job fails, and says why
    code, err, killed = _kill_second_rank_mid_features(
        _launch(*_fit(two, tiny_model_dir, data, "experts.parallel=experts")), two)
    assert code != 0 and "SIGKILL" in err, err[-3000:]  # the launcher names the root cause
    assert "process 0 of 2 stopped by SIGTERM; re-run the same command to resume" in err or "another process" in err
    manifest = json.loads((two / "elrea.json").read_text())
    assert manifest["stages"]["features"]["status"] == "running"
    # the same command resumes every shard where it stopped and finishes
    r = _run(_launch(*_fit(two, tiny_model_dir, data, "experts.parallel=experts")))
    assert "resuming at example" in r.stderr and "stage base: up to date, skipped" in r.stderr
    _run(_single(*_fit(one, tiny_model_dir, data, "experts.parallel=experts")))

    # features bitwise identical, clusters identical
    assert (one / "features" / "train.npy").read_bytes() == (two / "features" / "train.npy").read_bytes()
    shards = sorted((r["start"], r["end"]) for r in _shard_records(two))
    assert shards == [(0, 120), (120, 240)], shards
    labels = [json.loads((d / "clusters" / "clusters.json").read_text())["labels"] for d in (one, two)]
    assert labels[0] == labels[1]

    # expert-parallel: expert c trained alone on process c mod 2; data-parallel: on both
    C = json.loads((two / "clusters" / "clusters.json").read_text())["num_clusters"]
    for c in range(1, C + 1):
        assert json.loads((two / "experts" / str(c) / "training.json").read_text())["processes"] == [c % 2]
    stage = json.loads((two / "elrea.json").read_text())["stages"]["experts"]
    assert stage["status"] == "done" and stage["parallel"] == "experts" and stage["processes"] == 2
    data_par = tmp_path / "data_parallel"
    shutil.copytree(two, data_par)
    _run(_launch(*_fit(data_par, tiny_model_dir, data, "experts.parallel=data")))
    for c in range(1, C + 1):
        assert json.loads((data_par / "experts" / str(c) / "training.json").read_text())["processes"] == [0, 1]
    assert json.loads((data_par / "elrea.json").read_text())["stages"]["experts"]["parallel"] == "data"

    from elrea import ELREA

    for run in (two, data_par):  # both modes give loadable experts
        m = ELREA.from_pretrained(run, device="cpu")
        assert len(m.adapters) == C + 1 and len(m.generate(["Add 1 and 2."], max_new_tokens=3)) == 1

    # eval and generate over 2 processes: the same results as 1, in input order
    _run(_single("eval", two, "--data", test, "--output", tmp_path / "eval1.json", "--max-new-tokens", 4))
    r = _run(_launch("eval", two, "--data", test, "--output", tmp_path / "eval2.json", "--max-new-tokens", 4))
    assert r.stdout.count("accuracy (%)") == 1  # one table, from the main process
    e1, e2 = (json.loads((tmp_path / f"eval{k}.json").read_text()) for k in (1, 2))
    assert e1 == e2 and len(e2["examples"]) == 20
    assert [x["reference"] for x in e2["examples"]] == [json.loads(x)["response"] for x in open(test)]
    _run(_single("generate", two, "--input", test, "--output", tmp_path / "gen1.jsonl", "--max-new-tokens", 4))
    _run(_launch("generate", two, "--input", test, "--output", tmp_path / "gen2.jsonl", "--max-new-tokens", 4))
    g1, g2 = ((tmp_path / f"gen{k}.jsonl").read_text() for k in (1, 2))
    assert g1 == g2 and len(g1.splitlines()) == 20


def test_feature_store_resumes_shards_whatever_the_process_count(tmp_path):
    from elrea.rundir import FeatureStore

    store = FeatureStore(tmp_path / "f.npy", 10, 4, "fp")
    store.prepare()
    a, b = store.shard(0, 5), store.shard(5, 10)
    a.write(0, np.ones((3, 4)))
    a.commit(3)
    b.write(5, 2 * np.ones((5, 4)))
    b.commit(10)
    a.close(), b.close()
    assert store.covered() == [(0, 3), (5, 10)] and not store.complete() and store.rows_done() == 8
    store.prepare()  # resumable: kept
    whole = store.shard(0, 10)  # one process now: resumes after the covered prefix
    assert whole.done == 3
    whole.write(3, 3 * np.ones((2, 4)))
    whole.commit(5)
    whole.close()
    assert store.complete()
    X = np.load(tmp_path / "f.npy")
    assert (X[:3] == 1).all() and (X[3:5] == 3).all() and (X[5:] == 2).all()
    with pytest.raises(ValueError, match="outside shard"):
        store.shard(0, 5).write(4, np.ones((2, 4)))
    other = FeatureStore(tmp_path / "f.npy", 10, 4, "another fingerprint")
    other.prepare()  # not resumable: starts over
    assert other.covered() == [] and other.shard(0, 10).done == 0


def test_batch_plan_respects_size_and_token_budget():
    from elrea.features import plan_batches

    lengths = [5, 5, 5, 20, 5, 5, 100, 5]
    assert plan_batches(lengths, 3) == [(0, 3), (3, 6), (6, 8)]
    # at most 30 padded tokens: 3 x 5 fits, adding a 20-long one would need 4 x 20
    assert plan_batches(lengths, 16, max_tokens=30) == [(0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert plan_batches([], 4) == []
    plan = plan_batches(lengths, 2, max_tokens=40)
    assert [i for s, e in plan for i in range(s, e)] == list(range(len(lengths)))
    assert all((e - s) <= 2 and ((e - s) * max(lengths[s:e]) <= 40 or e - s == 1) for s, e in plan)


def test_processes_split_and_gather_alone():
    from elrea.distributed import Processes, map_batches

    p = Processes(0, 1, None)
    assert p.split([1, 2, 3]) == [1, 2, 3] and p.gather([4]) == [4] and p.broadcast(5) == 5
    assert map_batches(p, list(range(7)), 3, lambda b: [x * 10 for x in b]) == [x * 10 for x in range(7)]


def test_a_dead_peer_is_a_clear_error_not_a_traceback():
    from elrea.distributed import DistributedError, Processes

    p = Processes(1, 2, None)
    with pytest.raises(DistributedError, match=r"process 1 of 2: computing features failed because another "
                                                r"process .* \(Connection closed by peer \[127.0.0.1\]:29500\); re-run the same command"):
        with p._peers("computing features"):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\nmore detail")


def test_the_cli_destroys_the_process_group_before_it_exits(tmp_path, capsys):
    """A launched command ends its process group itself: left to the interpreter's teardown, gloo's
    threads can abort a finished process (SIGABRT) and the launcher reports the job failed."""
    import torch.distributed as dist

    from elrea.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["config"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
