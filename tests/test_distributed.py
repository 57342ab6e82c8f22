"""Sharded estimators over torch.distributed (2 gloo processes on CPU), resume after a killed rank,
Optuna workers sharing one SQLite study, and the pieces they are made of."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import dist_workers  # noqa: E402

from mpsearch.distributed import Shard, assign, measure_plans, parse_device_map  # noqa: E402
from mpsearch.errors import MpsearchError  # noqa: E402

SPAWN = mp.get_context("spawn")


def _launch(target, args_for_rank, world=2, timeout=120):
    procs = [SPAWN.Process(target=target, args=args_for_rank(r)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _single(cases, cache_dir=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same arithmetic
    try:
        return dist_workers.tables(cases, cache_dir)
    finally:
        torch.set_num_threads(threads)


EXACT = ["output-distance", "hessian", "hessian-micro"]
CLOSE = ["hessian-diagonal", "fisher"]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_tables(tmp_path):
    cases = EXACT + CLOSE
    codes = _launch(dist_workers.estimate_worker,
                    lambda r: (r, 2, str(tmp_path / "rdv"), cases, str(tmp_path)))
    assert codes == [0, 0]
    ref = _single(cases)
    for rank in (0, 1):
        got = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for case in cases:
            frame, meta = got[case]
            assert meta["distributed"]["world"] == 2 and meta["distributed"]["backend"] == "gloo"
            want = ref[case][0]
            assert list(frame["layer"]) == list(want["layer"])
            if case in EXACT:  # each unit computed once, reduced exactly: bit for bit
                assert np.array_equal(frame["damage"].to_numpy(), want["damage"].to_numpy()), case
            else:  # partial float64 sums added in another order, then float32 products
                np.testing.assert_allclose(frame["damage"], want["damage"], rtol=1e-6, atol=0, err_msg=case)
            assert (frame["damage"] > 0).any()
    # the work was split: each rank ran part of the suffix passes / probes / chunks, and together all
    meta = got["output-distance"][1]
    passes = [r["cost"]["suffix_passes"] for r in meta["distributed"]["ranks"]]
    assert min(passes) > 0 and sum(passes) == ref["output-distance"][1]["cost"]["suffix_passes"]
    # balanced by suffix length: a unit costs the blocks its suffix runs + 1 (the rest of the model);
    # the ranks' totals differ by at most one unit's cost (4: a layer of the first of the 3 blocks)
    cost = [r["cost"]["block_evaluations"] + r["cost"]["suffix_passes"] for r in meta["distributed"]["ranks"]]
    assert abs(cost[0] - cost[1]) <= 4, (cost, passes)
    hvps = [r["cost"]["hvps"] for r in got["hessian"][1]["distributed"]["ranks"]]
    assert min(hvps) > 0
    assert got["hessian"][1]["cost"]["probes"] == ref["hessian"][1]["cost"]["probes"]
    samples = [r["cost"]["forward_passes"] for r in got["fisher"][1]["distributed"]["ranks"]]
    assert min(samples) > 0


@pytest.mark.slow
def test_a_killed_rank_resumes_and_only_unfinished_units_are_recomputed(tmp_path):
    cache = tmp_path / "cache"
    case = ["output-distance"]
    # run 1: rank 1 is SIGKILLed at its 16th model forward (after its first saved units: the stacked
    # options' one-time check adds forwards before them); rank 0 is then stopped too
    codes = _launch(dist_workers.estimate_worker,
                    lambda r: (r, 2, str(tmp_path / "rdv1"), case, str(tmp_path), str(cache), 16),
                    timeout=30)
    assert codes[1] == -9
    files = sorted(cache.glob("output-distance-*-rank*of2.pt"))
    assert [f.name[-11:] for f in files] == ["rank0of2.pt", "rank1of2.pt"]
    # a unit is one (batch, layer): its options share one stacked suffix pass
    done = [int(torch.load(f, weights_only=True)["state"]["done"].any(-1).sum()) for f in files]
    assert done[1] > 0  # rank 1 had saved some of its units before it died
    # run 2: both ranks restart on the same cache
    codes = _launch(dist_workers.estimate_worker,
                    lambda r: (r, 2, str(tmp_path / "rdv2"), case, str(tmp_path), str(cache)))
    assert codes == [0, 0]
    frame, meta = pickle.loads((tmp_path / "rank0.pkl").read_bytes())[case[0]]
    ref = _single(case)[case[0]]
    assert np.array_equal(frame["damage"].to_numpy(), ref[0]["damage"].to_numpy())
    passes = [r["cost"].get("suffix_passes", 0) for r in meta["distributed"]["ranks"]]
    assert sum(passes) == ref[1]["cost"]["suffix_passes"] - sum(done)  # only what was unfinished


@pytest.mark.slow
def test_two_optuna_workers_share_one_sqlite_study(tmp_path):
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    log = tmp_path / "measured.log"
    n = 16
    barrier = SPAWN.Barrier(2)
    codes = _launch(dist_workers.optuna_worker, lambda w: (w, url, n, str(log), str(tmp_path), barrier))
    assert codes == [0, 0]
    study = optuna.load_study(study_name="shared", storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n
    assert len({t.number for t in complete}) == n
    lines = [line.split(" ", 1) for line in log.read_text().splitlines()]
    pids = {pid for pid, _ in lines}
    plans = [plan for _, plan in lines]
    assert len(pids) == 2  # both workers measured plans
    assert len(plans) == len(set(plans))  # no plan measured twice
    reused = [t for t in complete if "same_as" in t.user_attrs]
    assert len(plans) + len(reused) == n
    results = [pickle.loads((tmp_path / f"worker{w}.pkl").read_bytes()) for w in (0, 1)]
    assert results[0]["status"] == results[1]["status"] == "feasible"


# ------------------------------------------------------------------------------- the pieces


def test_assign_is_longest_first_to_the_least_loaded_rank():
    owners = assign([5, 4, 3, 3, 3], 2)
    # 5->0, 4->1, 3->1 (load 4<5), 3->0 (5<7), 3->0 or 1: loads 8 vs 7 -> 1
    assert owners.tolist() == [0, 1, 1, 0, 1]
    assert assign([1, 2, 3], 1).tolist() == [0, 0, 0]
    costs = np.arange(1, 41, dtype=float)[::-1]  # early layers cost more
    loads = np.bincount(assign(costs, 4), weights=costs, minlength=4)
    assert loads.max() - loads.min() <= costs.min() + 1e-9  # LPT on 1..40 balances within one unit
    with pytest.raises(MpsearchError, match="world size"):
        assign([1.0], 0)


def test_one_process_shard_owns_everything_and_sums_nothing():
    shard = Shard()
    assert not shard.enabled and shard.is_main and shard.suffix() == ""
    assert shard.assign([3, 1, 2]).all()
    t = torch.arange(3.0)
    assert shard.sum(t) is t
    assert shard.min_int([4, -2]) == [4, -2]


def test_measure_plans_in_worker_processes_keeps_the_order():
    model = torch.nn.Linear(2, 2)
    plans = list(range(7))
    got = measure_plans(model, plans, _square_pid, workers=3)
    assert [v for v, _ in got] == [p * p for p in plans]
    assert os.getpid() not in {pid for _, pid in got}  # measured in the worker processes
    assert [v for v, _ in measure_plans(model, plans, _square_pid, workers=1)] == [p * p for p in plans]
    with pytest.raises(MpsearchError, match="workers must be"):
        measure_plans(model, plans, _square_pid, workers=0)


def _square_pid(model, plan):
    return plan * plan, os.getpid()


def test_parse_device_map():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"a": 0, "b": "cpu"}') == {"a": 0, "b": "cpu"}
    with pytest.raises(MpsearchError, match="--device-map 'nope'"):
        parse_device_map("nope")
    with pytest.raises(MpsearchError, match="must be an object"):
        parse_device_map("[1, 2]")


def test_frontier_measured_by_two_worker_processes_equals_one(tmp_path):
    from mpsearch import zoo
    from mpsearch.metrics import Accuracy
    from mpsearch.pipeline import measured_frontier

    model, calib, evals = zoo.digits_mlp(), zoo.digits_batches("train"), zoo.digits_batches("test")
    kw = dict(estimator="weight-error", solver="greedy", options="2,4,8", validate=3, plots=False,
              progress=False)
    one = measured_frontier(model, calib, Accuracy(evals), out=tmp_path / "one", **kw)
    two = measured_frontier(model, calib, Accuracy(evals), out=tmp_path / "two", workers=2, **kw)
    pd.testing.assert_frame_equal(one.frontier, two.frontier)
    pd.testing.assert_frame_equal(one.uniform, two.uniform)
    cached = [json.loads((tmp_path / d / "measured.json").read_text())["results"] for d in ("one", "two")]
    assert cached[0] == cached[1] and len(cached[1]) >= 3  # the parent cached every worker's result


def test_estimators_keep_accelerate_device_hooks_and_their_tables():
    """A model dispatched by accelerate carries an AlignDevicesHook per module (moving inputs to the
    module's device); output-distance patches block forwards and must put the hooks back. On CPU every
    execution device is the CPU, so the tables must equal the plain model's exactly."""
    hooks = pytest.importorskip("accelerate.hooks")
    from mpsearch import get_estimator

    plain, batches = dist_workers.lm_setup()
    hooked, _ = dist_workers.lm_setup()
    for blk in hooked.layers:
        hooks.add_hook_to_module(blk, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    hooks.add_hook_to_module(hooked.head, hooks.AlignDevicesHook(execution_device="cpu"))
    wrapped = [blk.__dict__["forward"] for blk in hooked.layers]
    for name, params in [("output-distance", {"options": "2,4"}),
                         ("hessian", {"options": "2,4", "probes": 4, "min_probes": 2})]:
        a = get_estimator(name, **params).estimate(plain, batches, progress=False).frame
        b = get_estimator(name, **params).estimate(hooked, batches, progress=False).frame
        assert np.array_equal(a["damage"].to_numpy(), b["damage"].to_numpy()), name
    assert [blk.__dict__.get("forward") for blk in hooked.layers] == wrapped  # hooks still in place


def test_offloaded_weights_are_refused():
    from mpsearch.distributed import check_resident, follow

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(MpsearchError, match="layer '1' is offloaded by the device map"):
        check_resident(model)
    check_resident(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    w = torch.zeros(2, dtype=torch.float16)
    v = torch.ones(2)
    assert follow(v, w).dtype == torch.float16 and follow(w, w) is w


@pytest.mark.slow
def test_torchrun_cli_estimate_rank0_writes_the_single_process_table(tmp_path):
    import socket
    import subprocess

    from mpsearch.table import CostTable

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = f"{Path(__file__).parent / 'dist_workers.py'}"
    args = ["estimate", "--model", f"{spec}:lm_model", "--data", f"{spec}:lm_data",
            "--estimator", "output-distance", "--bits", "2,4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), "-m", "mpsearch", *args, "-o", str(tmp_path / "two.csv")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone prints
    one = subprocess.run([sys.executable, "-m", "mpsearch", *args, "-o", str(tmp_path / "one.csv")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = CostTable.read(tmp_path / "one.csv"), CostTable.read(tmp_path / "two.csv")
    assert np.array_equal(a.frame["damage"].to_numpy(), b.frame["damage"].to_numpy())
    assert b.metadata["distributed"]["world"] == 2 and "distributed" not in a.metadata


class _BehindShard:
    """A stand-in shard whose other rank saved its cache at an earlier point (progress ``low``)."""

    def __init__(self, low):
        self.low = low

    def min_int(self, values):
        mine = values[0]
        return [min(mine, self.low), -max(mine, self.low)]


def test_hessian_resume_brings_ranks_to_the_least_advanced_state():
    from mpsearch.sensitivity.hessian import _agree

    rows = [torch.full((2,), float(j)) for j in range(4)]
    n_max = 4
    ahead = {"batch": 1, "done": [(3, torch.stack(rows))], "current": rows[:1], "diag_total": None,
             "diag_batch": None}
    # the other rank had finished 2 probes of batch 0: progress 0 * (n_max + 1) + 2
    got = _agree(ahead, _BehindShard(2), n_max, diagonal=False)
    assert got["batch"] == 0 and got["done"] == []
    assert torch.equal(torch.stack(got["current"]), torch.stack(rows[:2]))
    # the other rank is at batch 1 with no probe yet: batch 0 stays done, the current probe is dropped
    got = _agree(ahead, _BehindShard(1 * (n_max + 1)), n_max, diagonal=False)
    assert got["batch"] == 1 and len(got["done"]) == 1 and got["current"] == []
    same = _agree(ahead, _BehindShard(1 * (n_max + 1) + 1), n_max, diagonal=False)
    assert same is ahead  # equal progress: nothing changes
    with pytest.warns(UserWarning, match="diagonal mode starts over"):
        fresh = _agree(ahead, _BehindShard(2), n_max, diagonal=True)
    assert fresh["batch"] == 0 and fresh["done"] == [] and fresh["current"] == []


def test_cli_estimate_with_a_device_map(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mpsearch.cli import main
    from mpsearch.table import CostTable

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    torch.save([torch.randint(0, 64, (2, 6))], tmp_path / "calib.pt")
    base = ["estimate", "--model", str(tmp_path / "llama"), "--data", str(tmp_path / "calib.pt"),
            "--estimator", "output-distance", "--bits", "2,4", "--no-progress"]
    assert main(base + ["--device-map", "auto", "-o", str(tmp_path / "mapped.csv")]) == 0
    assert main(base + ["-o", str(tmp_path / "plain.csv")]) == 0
    a, b = CostTable.read(tmp_path / "mapped.csv"), CostTable.read(tmp_path / "plain.csv")
    assert np.array_equal(a.frame["damage"].to_numpy(), b.frame["damage"].to_numpy())
    capsys.readouterr()
    assert main(base + ["--device-map", "everywhere", "-o", str(tmp_path / "bad.csv")]) == 2
    assert "--device-map 'everywhere': write auto, balanced" in capsys.readouterr().err
    spec = f"{Path(__file__).parent / 'dist_workers.py'}:lm_model"
    assert main(["estimate", "--model", spec, "--device-map", "auto", "-o", str(tmp_path / "bad.csv")]) == 2
    assert "--device-map needs a local Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()
