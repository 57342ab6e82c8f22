"""Worker processes for tests/test_distributed.py (spawned: they import this module, not the test)."""

from __future__ import annotations

import os
import pickle
import signal
import time

import torch


def lm_setup():
    """The tiny transformer LM of the estimator tests with three calibration batches."""
    from sensitivity_models import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 16, (n, 5), generator=g) for n in (3, 2, 4)]
    return model, batches


#: estimator name -> settings: every sharded code path (rounds of probes, micro-batches, diagonal)
CASES = {
    "output-distance": ("output-distance", {"options": "2,4,keep"}),
    "hessian": ("hessian", {"options": "2,4", "probes": 8, "min_probes": 3, "tol": 0.3}),
    "hessian-micro": ("hessian", {"options": "2,4", "probes": 8, "min_probes": 3, "tol": 0.3,
                                  "micro_batch": 2}),
    "hessian-diagonal": ("hessian", {"options": "2,4", "probes": 6, "min_probes": 3, "tol": 0.0,
                                     "mode": "diagonal"}),
    "fisher": ("fisher", {"options": "2,4", "chunk_size": 3}),
}


def tables(cases, cache_dir=None):
    """``{case: (damage frame, metadata)}`` for the named cases, in this process."""
    from mpsearch import get_estimator

    model, batches = lm_setup()
    out = {}
    for case in cases:
        name, params = CASES[case]
        if cache_dir is not None:
            params = {**params, "cache_dir": cache_dir, "cache_every": 0.0}
        table = get_estimator(name, **params).estimate(model, batches, progress=False)
        out[case] = (table.frame, table.metadata)
    return out


def _init(rank, world, rdv):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)


def estimate_worker(rank, world, rdv, cases, out_dir, cache_dir=None, die_after=None):
    """One rank: estimate ``cases`` and pickle the tables to ``out_dir/rank{rank}.pkl``.

    ``die_after``: rank 1 kills itself (SIGKILL, no clean-up) at that many model forwards.
    """
    import torch.distributed as dist

    _init(rank, world, rdv)
    if die_after is not None and rank == 1:
        from mpsearch import get_estimator

        model, batches = lm_setup()
        calls = [0]

        def count(mod, args, output):
            calls[0] += 1
            if calls[0] >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)

        model.head.register_forward_hook(count)
        name, params = CASES[cases[0]]
        get_estimator(name, **params, cache_dir=cache_dir, cache_every=0.0).estimate(
            model, batches, progress=False)
        return
    result = tables(cases, cache_dir)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- optuna workers


def optuna_table():
    """A synthetic table of 6 layers x 4 options (4,096 plans), the same in every worker."""
    import numpy as np
    import pandas as pd

    from mpsearch.table import CostTable

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        for b in (2, 3, 4, 8):
            rows.append({"layer": f"l{i}", "bits": b, "damage": float(rng.random() * 2.0 ** -b),
                         "size_bits": 100.0 * b, "params": 100})
    return CostTable(pd.DataFrame(rows))


class LoggedObjective:
    """A 'measured' objective: appends each plan it measures to a log file, then scores it."""

    def __init__(self, log, table):
        self.log, self.damage = log, {(r.layer, r.bits): r.damage for r in table.frame.itertuples()}

    def __call__(self, plan):
        key = ",".join(f"{n}={plan.bits[n]}" for n in sorted(plan.bits))
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {key}\n")
        time.sleep(0.01)  # a measurement takes time: workers interleave
        return sum(self.damage[(n, b)] for n, b in plan.bits.items())


def optuna_worker(worker, url, n_trials, log, out_dir, barrier):
    from mpsearch import Budget, get_solver

    torch.set_num_threads(1)
    table = optuna_table()
    barrier.wait(60)  # both workers start together (imports take seconds on a loaded machine)
    solver = get_solver("optuna", n_trials=n_trials, storage=url, study_name="shared",
                        objective=LoggedObjective(log, table), worker=worker)
    result = solver.solve(table, Budget.parse(["avg_bits=4"]))
    with open(os.path.join(out_dir, f"worker{worker}.pkl"), "wb") as f:
        pickle.dump({"status": result.status, "bits": result.plan.bits if result.plan else None}, f)


def lm_model():
    """Model spec for the CLI test: ``tests/dist_workers.py:lm_model``."""
    return lm_setup()[0]


def lm_data():
    """Data spec for the CLI test: ``tests/dist_workers.py:lm_data``."""
    return lm_setup()[1]
