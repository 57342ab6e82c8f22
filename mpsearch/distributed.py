"""Work across processes and devices: torch.distributed shards, accelerate device maps, Optuna workers.

**Sharded estimators.** Launched under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or inside
an initialised ``torch.distributed`` process group, the estimators split their work between ranks:

- ``output-distance``: the (batch, layer, option) grid; each unit costs one suffix run, so units are
  weighted by the blocks their suffix runs (early layers cost more) and dealt out longest first to the
  least loaded rank (:func:`assign`);
- ``hessian``: the Hutchinson probes of each batch, in rounds of ``world`` probes (probe ``j`` on
  rank ``j % world``); the stopping rule then reads the gathered probes in order, as one process would;
- ``fisher``: the sample chunks, dealt out like output-distance's units (all of equal cost).

Two calls are all an estimator needs: :meth:`Shard.assign` ("which of these units are mine") and
:meth:`Shard.sum` (reduce). Where each unit's value is owned by one rank and the others hold exact
zeros, the sum is exact, so output-distance and hessian (trace) tables equal the single-process
table bit for bit; fisher and hessian's diagonal mode sum per-rank partial float64 sums, equal to the
single-process table within a relative 1e-6 (float64 sums in another order, then float32 products).
Every rank ends with the whole table; rank 0 alone writes it and prints. ``nccl`` on GPUs (rank ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
The estimator cache is per rank (``...-rank1of2.pt``): a rank that is killed and restarted
recomputes only its own unfinished units.

**Device maps.** :func:`load_device_map` loads a Hugging Face directory with accelerate's
``device_map`` (``"auto"``, ``"balanced"``, a JSON dict...); the estimators, the applier and the
metrics then move each tensor to the device of the layer that uses it. Offloaded weights (``disk``,
or ``cpu`` offload under a GPU main device) are refused: their values are not resident to quantize.

**Optuna workers and plan measurement.** :func:`optuna_worker` runs one worker of a study shared
through Optuna's own storage (``sqlite:///study.db``, a PostgreSQL URL, or a journal file);
:func:`measure_plans` spreads a list of plans over ranks or local worker processes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .env import env_choice, local_rank, rank, world_size
from .errors import close_matches, MpsearchError
from .hf import offline_transformers as _offline_transformers
from .layers import quantizable_names, weight_tensor
from .sources import model_source


def assign(costs, world: int) -> np.ndarray:
    """Owner rank of each unit: longest first to the least loaded rank (deterministic LPT).

    ``costs`` is one number per unit; ties in cost keep the units' order, ties in load go to the
    lowest rank. The makespan is at most 4/3 of the optimum (Graham's bound).
    """
    costs = np.asarray(costs, dtype=float).reshape(-1)
    world = int(world)
    if world < 1:
        raise MpsearchError(f"world size must be >= 1, got {world}")
    owners = np.zeros(len(costs), dtype=np.int64)
    if world == 1 or len(costs) == 0:
        return owners
    load = np.zeros(world)
    for i in np.argsort(-costs, kind="stable"):
        r = int(np.argmin(load))  # argmin takes the lowest rank among equal loads
        owners[i] = r
        load[r] += costs[i]
    return owners


@dataclass
class Shard:
    """This process's place in the job: rank, world size, backend and the device for reductions."""

    rank: int = 0
    world: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reduce_seconds: float = 0.0
    reductions: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def assign(self, costs) -> np.ndarray:
        """A boolean mask: which of these units (one cost each) this rank computes."""
        return assign(costs, self.world) == self.rank

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all ranks (every rank gets it), on ``tensor``'s device."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        t0 = time.perf_counter()
        home = tensor.device
        work = tensor.detach().to(self.device).contiguous().clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        out = work.to(home)
        self.reduce_seconds += time.perf_counter() - t0
        self.reductions += 1
        return out

    def min_int(self, values) -> list[int]:
        """The elementwise minimum of a few integers over all ranks."""
        t = torch.tensor([int(v) for v in values], dtype=torch.int64)
        if not self.enabled:
            return t.tolist()
        import torch.distributed as dist

        work = t.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.MIN)
        return work.cpu().tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        t0 = time.perf_counter()
        dist.all_gather_object(out, obj)
        self.reduce_seconds += time.perf_counter() - t0
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def suffix(self) -> str:
        """The per-rank part of a cache file name (empty for one process)."""
        return f"-rank{self.rank}of{self.world}" if self.enabled else ""


_SINGLE = Shard()


def current() -> Shard:
    """The :class:`Shard` of this process.

    Inside an initialised ``torch.distributed`` group: its rank and size. Otherwise, under ``torchrun``
    (``WORLD_SIZE`` > 1): the group is initialised here from the environment (``nccl`` when CUDA is
    available, else ``gloo``; ``MPSEARCH_BACKEND=gloo`` forces gloo, e.g. for several ranks sharing one
    GPU). Otherwise: rank 0 of 1.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return _SINGLE
    if not dist.is_initialized():
        if world_size() <= 1:
            return _SINGLE
        init_from_env()
    world = dist.get_world_size()
    if world <= 1:
        return _SINGLE
    backend = str(dist.get_backend())
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    key = (dist.get_rank(), world, backend)
    shard = _SHARDS.get(key)
    if shard is None:
        shard = _SHARDS[key] = Shard(rank=key[0], world=world, backend=backend, device=device)
    return shard


_SHARDS: dict = {}


def init_from_env(backend: str | None = None) -> None:
    """Initialise the default process group from torchrun's environment variables."""
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise MpsearchError(
                f"WORLD_SIZE is set but {var} is not: launch with torchrun "
                f"(torchrun --nproc-per-node N -m mpsearch ...) or unset WORLD_SIZE"
            )
    rank()  # RANK and WORLD_SIZE: integers, rank < world size
    if backend is None:
        backend = env_choice("MPSEARCH_BACKEND", ("nccl", "gloo")) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise MpsearchError(f"MPSEARCH_BACKEND must be nccl or gloo, got {backend!r}")
    if backend == "nccl":
        gpu = local_rank()
        if gpu >= torch.cuda.device_count():
            raise MpsearchError(f"environment variable LOCAL_RANK={gpu} names a GPU this host does not have "
                                f"({torch.cuda.device_count()} visible); launch with torchrun --nproc-per-node "
                                f"at most the number of GPUs")
        torch.cuda.set_device(gpu)
    dist.init_process_group(backend=backend)


def rank_device(shard: Shard | None = None) -> torch.device | None:
    """The GPU this rank should hold its model on (``cuda:LOCAL_RANK``), or ``None`` on CPU."""
    shard = shard or current()
    if shard.backend == "nccl":
        return shard.device
    return None


def place_model(model: torch.nn.Module, shard: Shard | None = None) -> torch.nn.Module:
    """Under an nccl job, move a model that sits on the CPU (and has no device map) to this rank's GPU."""
    dev = rank_device(shard)
    if dev is None or getattr(model, "hf_device_map", None):
        return model
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu":
        model.to(dev)
    return model


def stats(shard: Shard, busy_seconds: float, extra: dict | None = None) -> dict | None:
    """Gather per-rank busy time, reduction time and extras into one dict (``None`` for one process)."""
    if not shard.enabled:
        return None
    peak = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's GPU
        peak = round(torch.cuda.max_memory_allocated(torch.cuda.current_device()) / 2**30, 4)
    mine = {"rank": shard.rank, "busy_seconds": round(busy_seconds - shard.reduce_seconds, 4),
            "reduce_seconds": round(shard.reduce_seconds, 4), "reductions": shard.reductions,
            "peak_gib": peak, **(extra or {})}
    ranks = shard.gather(mine)
    return {"world": shard.world, "backend": shard.backend, "ranks": ranks}


# ------------------------------------------------------------------------------ device maps


def parse_device_map(text):
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, a JSON object, or a dict as it is."""
    if isinstance(text, dict) or text is None:
        return text
    text = str(text).strip()
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise MpsearchError(
            f"--device-map {text!r}: write auto, balanced, balanced_low_0, sequential, or a JSON object "
            f"such as '{{\"model.layers.0\": 0, \"model.layers.1\": 1}}'"
        ) from None
    if not isinstance(value, dict):
        raise MpsearchError(f"--device-map {text!r}: a JSON device map must be an object (module -> device)")
    return value


#: the device-map strategies of accelerate
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map):
    """``device_map`` parsed (:func:`parse_device_map`) with every device it names checked: a GPU
    index or ``cuda:N`` this host has, ``cpu`` or ``disk`` (refused later if a quantizable layer
    lands there: :func:`check_resident`). One line naming the entry otherwise, before any model loads."""
    device_map = parse_device_map(device_map)
    if device_map is None or isinstance(device_map, str):  # a strategy: accelerate uses what the host has
        return device_map
    if not device_map:
        raise MpsearchError("--device-map: the JSON object is empty; map module names to devices, e.g. "
                            "'{\"\": 0}' for the whole model on GPU 0")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for module, dev in device_map.items():
        index = None
        if isinstance(dev, int) and not isinstance(dev, bool):
            index = dev
        elif isinstance(dev, str) and dev in ("cpu", "disk"):
            continue
        elif isinstance(dev, str) and (dev == "cuda" or dev.startswith("cuda:")):
            tail = dev[5:]
            index = int(tail) if tail.isascii() and tail.isdigit() else (0 if dev == "cuda" else None)
        if index is None or index < 0:
            raise MpsearchError(f"--device-map: module {module!r} -> {dev!r}: a device is a GPU index (0, 1...), "
                                f"'cuda:N', 'cpu' or 'disk'")
        if index >= gpus:
            raise MpsearchError(f"--device-map: module {module!r} -> {dev!r} names GPU {index}, but this host has "
                                f"{gpus} visible CUDA GPU(s)" + ("" if gpus else "; map it to 'cpu' or drop --device-map"))
    return device_map


def check_device_map_modules(device_map, model: torch.nn.Module, source: str = "the model") -> None:
    """Every module a JSON ``device_map`` names exists in ``model`` (built on the meta device)."""
    if not isinstance(device_map, dict):
        return
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for module in device_map:
        if module != "" and module not in names:
            raise MpsearchError(f"--device-map names module {module!r}, which {source} does not have"
                                f"{close_matches(str(module), sorted(names))}")


def check_resident(model: torch.nn.Module) -> None:
    """Refuse a model whose quantizable weights are offloaded (on the meta device between forwards)."""
    for name in quantizable_names(model):
        w = weight_tensor(model, name)
        if isinstance(w, torch.Tensor) and w.device.type == "meta":
            raise MpsearchError(
                f"layer {name!r} is offloaded by the device map (its weight is not resident on a device): "
                f"mpsearch quantizes weights in place, so give the map enough GPU memory (max_memory) or "
                f"place every layer on a GPU or, with no GPU layer, on the CPU"
            )


def load_device_map(path, device_map="auto", *, dtype=None, max_memory=None) -> torch.nn.Module:
    """Load a Hugging Face model directory (or a cached Hugging Face id) spread over devices with
    accelerate's ``device_map``."""
    from pathlib import Path

    device_map = check_device_map(device_map)
    source = model_source(str(path)) if not isinstance(path, torch.nn.Module) else None
    path = source.folder if source is not None and source.gguf_file is None else Path(str(path))
    if not (path / "config.json").is_file():
        raise MpsearchError(
            f"--device-map needs a local Hugging Face model directory (with config.json); got {str(path)!r}"
        )
    transformers = _offline_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise MpsearchError(f"{str(path)!r}: its config.json cannot be read: {' '.join(str(exc).split())[:200]}") \
            from None
    arch = " ".join(getattr(config, "architectures", None) or [])
    if "ForCausalLM" in arch or "LMHeadModel" in arch:
        auto = transformers.AutoModelForCausalLM
    elif "ForSequenceClassification" in arch:
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModel
    if isinstance(device_map, dict):  # the module names, on an empty (meta) model, before any weight loads
        from accelerate import init_empty_weights

        with init_empty_weights():
            skeleton = auto.from_config(config)
        check_device_map_modules(device_map, skeleton, f"the model in {str(path)!r}")
    kw = {"device_map": device_map, "local_files_only": True}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if max_memory is not None:
        kw["max_memory"] = max_memory
    try:
        model = auto.from_pretrained(path, **kw).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise MpsearchError(f"loading {str(path)!r} with device_map={device_map!r} failed: {exc}") from None
    check_resident(model)
    return model


def dispatch(model: torch.nn.Module, device_map: dict, *, main_device=None) -> torch.nn.Module:
    """Spread an already built model over devices with accelerate (``module name -> device``).

    ``main_device="cpu"`` keeps CPU-mapped modules computing on the CPU (not offloaded).
    """
    from accelerate import dispatch_model

    model = dispatch_model(model, device_map=device_map, main_device=main_device)
    check_resident(model)
    return model


def follow(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the device (and dtype) of ``like``: a probe, an error or an input follows its layer."""
    if tensor.device == like.device and tensor.dtype == like.dtype:
        return tensor
    return tensor.to(device=like.device, dtype=like.dtype)


# ------------------------------------------------------------------------------ optuna workers


def optuna_storage(url: str):
    """An Optuna storage from a URL: an RDB URL (``sqlite:///study.db``, ``postgresql://...``) or
    ``journal:PATH`` for a JournalStorage on a shared file."""
    import optuna

    if not isinstance(url, str) or not url:
        raise MpsearchError("storage must be an Optuna storage URL such as sqlite:///study.db or journal:study.log")
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(5):
        try:  # heartbeats: a trial of a worker that died is marked failed, not left running
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30,
                                              grace_period=120)
        except Exception as exc:  # sqlalchemy raises its own errors for bad URLs
            # workers creating one new database at once race on its schema: the loser retries
            if "UNIQUE constraint" in str(exc) or "already exists" in str(exc) or "locked" in str(exc):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise MpsearchError(f"optuna: cannot open storage {url!r}: {exc}") from None
    raise MpsearchError(f"optuna: cannot open storage {url!r}: its schema could not be created")


def measure_plans(model, plans: list, measure, *, workers: int = 1, shard: Shard | None = None) -> list:
    """``measure(model, plan)`` for every plan, spread over ranks or local worker processes.

    Under a distributed job (``torchrun``), plan ``i`` is measured on rank ``i % world`` and the
    results are gathered on every rank. Otherwise ``workers`` > 1 forks that many processes on this
    host (CPU models; on GPUs launch with torchrun instead, one rank per GPU), each measuring every
    ``workers``-th plan. Results come back in the order of ``plans``.
    """
    shard = shard or current()
    n = len(plans)
    if shard.enabled:
        mine = {i: measure(model, plans[i]) for i in range(shard.rank, n, shard.world)}
        merged = {}
        for part in shard.gather(mine):
            merged.update(part)
        return [merged[i] for i in range(n)]
    workers = int(workers)
    if workers < 1:
        raise MpsearchError(f"workers must be an integer >= 1, got {workers!r}")
    if workers == 1 or n <= 1:
        return [measure(model, p) for p in plans]
    first = next(model.parameters(), None)
    if first is not None and first.device.type != "cpu":
        raise MpsearchError(
            "workers > 1 forks processes, which cannot share a GPU model: on GPUs launch with "
            "torchrun --nproc-per-node N (one rank per GPU) instead"
        )
    import multiprocessing as mp

    workers = min(workers, n)
    ctx = mp.get_context("fork")
    global _FORKED
    _FORKED = (model, plans, measure)
    try:
        with ctx.Pool(workers, initializer=_single_thread) as pool:
            parts = pool.map(_measure_slice, [(w, workers) for w in range(workers)])
    finally:
        _FORKED = None
    merged = {}
    for part in parts:
        merged.update(part)
    return [merged[i] for i in range(n)]


_FORKED = None


def _single_thread():
    torch.set_num_threads(1)


def _measure_slice(args):
    w, workers = args
    model, plans, measure = _FORKED
    return {i: measure(model, plans[i]) for i in range(w, len(plans), workers)}
