"""fisher, output-distance, lim, lrp and the resumable cache, each against an independent computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mpsearch
from mpsearch.quant import quantization_error, quantize_weight
from mpsearch.sensitivity import cache as cache_mod
from mpsearch.sensitivity import fisher as fisher_mod
from mpsearch.sensitivity.base import EstimatorWarning

from sensitivity_models import cnn_batches, lm_batches, tiny_bert

OPTS = ["int2", "int3", "int4", "int8"]


def _damage(table):
    return table.pivot("damage").to_numpy()


# ----------------------------------------------------------------------------------- fisher
def _explicit_fisher_damage(model, batches):
    """Per-sample loop written out: F = mean_n g_n^2, damage = sum F dW^2."""
    names = [n for n, _m, _k in mpsearch.layers.iter_quantizable(model)]
    weights = [model.get_submodule(n).weight for n in names]
    sums, count = [torch.zeros_like(w) for w in weights], 0
    for x, y in batches:
        for i in range(len(x)):
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                s += g.pow(2)
            count += 1
    out = np.zeros((len(names), len(OPTS)))
    for i, (n, w) in enumerate(zip(names, weights)):
        kind = mpsearch.layers._kind(model.get_submodule(n))
        for k, opt in enumerate(OPTS):
            out[i, k] = float((sums[i] / count * quantization_error(w, mpsearch.parse_option(opt), kind).pow(2)).sum())
    return out


@pytest.mark.parametrize("per_sample, chunk", [("vmap", 4), ("loop", 3), ("vmap", 100)])
def test_fisher_equals_an_explicit_per_sample_loop(per_sample, chunk):
    model, batches = cnn_batches()
    table = mpsearch.get_estimator("fisher", per_sample=per_sample, chunk_size=chunk, options="2,3,4,8").estimate(
        model, batches, progress=False)
    np.testing.assert_allclose(_damage(table), _explicit_fisher_damage(model, batches), rtol=1e-4, atol=1e-12)
    assert table.metadata["cost"]["samples"] == 10 and table.metadata["cost"]["per_sample"] == per_sample


def test_fisher_is_not_the_squared_mean_gradient():
    model, batches = cnn_batches()
    table = mpsearch.get_estimator("fisher", options="2,3,4,8").estimate(model, batches, progress=False)
    w = model[5].weight
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
    g = torch.autograd.grad(F.cross_entropy(model(x), y), w)[0]
    err = quantization_error(w, mpsearch.parse_option("int2")).pow(2)
    squared_mean = float((g.pow(2) * err).sum())
    assert _damage(table)[-1, 0] > 1.5 * squared_mean


def test_fisher_memory_is_bounded_by_the_chunk(monkeypatch):
    seen = []
    real = fisher_mod._vmap_grads

    def spy(model, weights, args, kwargs, target, lossfn):
        seen.append(len(args[0]))
        return real(model, weights, args, kwargs, target, lossfn)

    monkeypatch.setattr(fisher_mod, "_vmap_grads", spy)
    model, batches = cnn_batches()
    mpsearch.get_estimator("fisher", chunk_size=4).estimate(model, batches, progress=False)
    assert seen == [4, 2, 4]


def test_fisher_without_targets_samples_them_from_the_model():
    model, batches = lm_batches()
    a = mpsearch.get_estimator("fisher", seed=1).estimate(model, batches, progress=False)
    b = mpsearch.get_estimator("fisher", seed=2).estimate(model, batches, progress=False)
    assert (_damage(a) > 0).all() and not np.array_equal(_damage(a), _damage(b))


def test_fisher_on_hf_bert_embeddings():
    model, batches = tiny_bert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)  # vmap may fall back to the loop
        table = mpsearch.get_estimator("fisher", output="embedding", chunk_size=2).estimate(
            model, batches, progress=False)
    assert len(table.layers) == 12 and (_damage(table)[:, 0] > 0).all()


def test_fisher_and_lrp_settings_refused_before_any_model():
    """Their settings were checked only once the model ran; now by get_estimator, as the others."""
    with pytest.raises(mpsearch.MpsearchError, match="'chunk_size' must be an integer > 0, got 0"):
        mpsearch.get_estimator("fisher", chunk_size=0)
    with pytest.raises(mpsearch.MpsearchError, match="'per_sample' must be one of 'auto', 'vmap', 'loop'"):
        mpsearch.get_estimator("fisher", per_sample="jac")
    with pytest.raises(mpsearch.MpsearchError, match="'loss' must be one of 'auto', 'ce', 'distill' or a callable"):
        mpsearch.get_estimator("fisher", loss="mse")
    with pytest.raises(mpsearch.MpsearchError, match="'relevance' must be one of 'auto', 'label'"):
        mpsearch.get_estimator("lrp", relevance="logit")
    with pytest.raises(mpsearch.MpsearchError, match="'eps' must be a number >= 0, got -1"):
        mpsearch.get_estimator("lrp", eps=-1)


# --------------------------------------------------------------------------- output-distance
def _manual_distance(model, batches, metric):
    names = [n for n, _m, _k in mpsearch.layers.iter_quantizable(model)]
    out = np.zeros((len(names), len(OPTS)))
    total = sum(len(b[0]) if isinstance(b, tuple) else len(b) for b in batches)
    for bi, b in enumerate(batches):
        x = b[0] if isinstance(b, tuple) else b
        with torch.no_grad():
            ref = model(x)
            for i, n in enumerate(names):
                mod = model.get_submodule(n)
                saved = mod.weight.clone()
                for k, opt in enumerate(OPTS):
                    mod.weight.copy_(quantize_weight(saved, mpsearch.parse_option(opt), mpsearch.layers._kind(mod)))
                    q, r = model(x).double(), ref.double()
                    if metric == "kl":
                        d = F.kl_div(F.log_softmax(q, -1).flatten(0, -2), F.log_softmax(r, -1).flatten(0, -2),
                                     log_target=True, reduction="batchmean")
                    else:
                        d = (q - r).pow(2).mean()
                    out[i, k] += len(x) / total * float(d)
                mod.weight.copy_(saved)
    return out


@pytest.mark.parametrize("case, metric", [(cnn_batches, "kl"), (lm_batches, "mse")])
def test_output_distance_equals_a_manual_measurement(case, metric):
    model, batches = case()
    table = mpsearch.get_estimator("output-distance", metric=metric, options="2,3,4,8").estimate(
        model, batches, progress=False)
    np.testing.assert_allclose(_damage(table), _manual_distance(model, batches, metric), rtol=1e-5, atol=1e-12)


def _manual_base_distance(model, batches, base, metric):
    """d(layer at option, the rest at ``base``) - d(layer at fp, the rest at ``base``), by hand."""
    names = [n for n, _m, _k in mpsearch.layers.iter_quantizable(model)]
    mods = [model.get_submodule(n) for n in names]
    fp = [m.weight.detach().clone() for m in mods]
    based = [quantize_weight(w, mpsearch.parse_option(base[n]), mpsearch.layers._kind(m)) if base.get(n, "keep") != "keep"
             else w for n, m, w in zip(names, mods, fp)]
    out = np.zeros((len(names), len(OPTS)))
    total = sum(len(b[0]) for b in batches)

    def dist(q, r):
        if metric == "kl":
            return float(F.kl_div(F.log_softmax(q.double(), -1), F.log_softmax(r.double(), -1), log_target=True,
                                  reduction="batchmean"))
        return float((q.double() - r.double()).pow(2).mean())

    with torch.no_grad():
        for x, _y in batches:
            ref = model(x)
            for i, m in enumerate(mods):
                for j, mj in enumerate(mods):
                    mj.weight.copy_(based[j] if j != i else fp[i])
                d0 = dist(model(x), ref)
                for k, opt in enumerate(OPTS):
                    m.weight.copy_(quantize_weight(fp[i], mpsearch.parse_option(opt), mpsearch.layers._kind(m)))
                    out[i, k] += len(x) / total * (dist(model(x), ref) - d0)
                for j, mj in enumerate(mods):
                    mj.weight.copy_(fp[j])
    return np.clip(out, 0, None)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_output_distance_around_a_base_equals_a_manual_measurement(prefix_cache):
    model, batches = cnn_batches()
    names = [n for n, _m, _k in mpsearch.layers.iter_quantizable(model)]
    before = [p.detach().clone() for p in model.parameters()]
    base = dict(zip(names, ["int3", "keep", "int4", "int2", "int8"][: len(names)]))
    table = mpsearch.get_estimator("output-distance", metric="kl", options="2,3,4,8", base=base,
                                   prefix_cache=prefix_cache).estimate(model, batches, progress=False)
    want = _manual_base_distance(model, batches, base, "kl")
    np.testing.assert_allclose(_damage(table), want, rtol=1e-5, atol=1e-12)
    # not the table around full precision, and the model is left as it was
    plain = mpsearch.get_estimator("output-distance", metric="kl", options="2,3,4,8").estimate(model, batches, progress=False)
    assert np.abs(_damage(plain) - want).max() > 0.05 * np.abs(want).max()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert table.metadata["base"]["layers"] == sum(v != "keep" for v in base.values())
    # an option name: every layer at it; int8 as the base differs from fp by little
    t8 = mpsearch.get_estimator("output-distance", metric="kl", options="2,3,4,8", base="int8").estimate(
        model, batches, progress=False)
    np.testing.assert_allclose(_damage(t8), _manual_base_distance(model, batches, dict.fromkeys(names, "int8"), "kl"),
                               rtol=1e-5, atol=1e-12)


def test_output_distance_base_refusals():
    model, batches = cnn_batches()
    with pytest.raises(mpsearch.MpsearchError, match="^output-distance base names layer.*not plan"):
        mpsearch.get_estimator("output-distance", base={"nope": "int4"}).estimate(model, batches, progress=False)
    with pytest.raises(mpsearch.MpsearchError, match="weight-only"):
        mpsearch.get_estimator("output-distance", options="w8a8-int8,int8", base="w8a8-int8").estimate(model, batches, progress=False)
    with pytest.raises(mpsearch.MpsearchError, match="^output-distance base: option bits must be 1-8"):
        mpsearch.get_estimator("output-distance", base="int99").estimate(model, batches, progress=False)


@pytest.mark.parametrize("case", [cnn_batches, lm_batches, tiny_bert])
def test_prefix_caching_equals_uncached(case):
    model, batches = case()
    kw = {"output": "embedding"} if case is tiny_bert else {}
    cached = mpsearch.get_estimator("output-distance", options="2,4", **kw).estimate(model, batches, progress=False)
    plain = mpsearch.get_estimator("output-distance", options="2,4", prefix_cache=False, **kw).estimate(model, batches, progress=False)
    np.testing.assert_allclose(_damage(cached), _damage(plain), rtol=1e-5, atol=1e-10)
    c, p = cached.metadata["cost"], plain.metadata["cost"]
    assert c["prefix_cache"] and c["cached_blocks"] == c["blocks"] >= 2
    assert c["block_evaluations"] < p["block_evaluations"]
    if case is tiny_bert:
        assert c["block_list"] == "encoder.layer"


def test_prefix_cache_respects_its_memory_limit():
    model, batches = lm_batches()
    full = mpsearch.get_estimator("output-distance", options="2").estimate(model, batches, progress=False)
    per_block_mb = 3 * 5 * 8 * 4 / 2**20
    limited = mpsearch.get_estimator("output-distance", options="2", max_cache_mb=1.2 * per_block_mb).estimate(
        model, batches, progress=False)
    none = mpsearch.get_estimator("output-distance", options="2", max_cache_mb=0).estimate(model, batches, progress=False)
    assert limited.metadata["cost"]["cached_blocks"] == 1
    assert limited.metadata["cost"]["cache_mb"] <= 1.2 * per_block_mb
    assert none.metadata["cost"]["cached_blocks"] == 0
    for t in (limited, none):
        np.testing.assert_allclose(_damage(t), _damage(full), rtol=1e-5, atol=1e-10)
    assert (full.metadata["cost"]["block_evaluations"] < limited.metadata["cost"]["block_evaluations"]
            < none.metadata["cost"]["block_evaluations"])


class Parallel(nn.Module):
    """A ModuleList whose children are not a chain: caching must notice and fall back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.branches = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        return sum(b(x) for b in self.branches)


def test_non_chain_models_fall_back_to_full_forwards():
    model, x = Parallel().eval(), torch.randn(5, 4)
    with pytest.warns(EstimatorWarning, match="do not run as a chain.*prefix caching is off"):
        table = mpsearch.get_estimator("output-distance", metric="mse").estimate(model, [x], progress=False)
    plain = mpsearch.get_estimator("output-distance", metric="mse", prefix_cache=False).estimate(
        model, [x], progress=False)
    np.testing.assert_allclose(_damage(table), _damage(plain), rtol=1e-6)
    assert table.metadata["cost"]["prefix_cache"] is False


def test_output_distance_bad_metric():
    model, batches = cnn_batches()
    with pytest.raises(mpsearch.MpsearchError, match="metric must be one of 'auto', 'cosine', 'mse', 'kl', got 'l1'"):
        mpsearch.get_estimator("output-distance", metric="l1").estimate(model, batches, progress=False)


# ------------------------------------------------------------------------------------ lim
def test_lim_scores_are_one_minus_cosine_of_block_input_and_output():
    blocks = [nn.Linear(3, 3, bias=False) for _ in range(3)]
    with torch.no_grad():
        blocks[0].weight.copy_(2 * torch.eye(3))  # scales: cos = 1, score 0
        blocks[1].weight.copy_(-torch.eye(3))  # negates: cos = -1, score 2
        blocks[2].weight.copy_(torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 0]]))  # rotates x,y; drops z
    model = nn.Sequential(*blocks)
    x = torch.tensor([[1.0, 0, 0], [0, 1, 0]])  # z = 0: the rotation is orthogonal: cos 0, score 1
    table = mpsearch.get_estimator("lim", options="2,4").estimate(model, [x], progress=False)
    scores = table.metadata["lim"]["scores"]
    assert scores == pytest.approx({"0": 0.0, "1": 2.0, "2": 1.0}, abs=1e-9)
    rel = _relative_errors(model, table)
    np.testing.assert_allclose(_damage(table), np.array([[0.0], [2.0], [1.0]]) * rel, atol=1e-12)


def _relative_errors(model, table):
    """||Q_b(W) - W||^2 / ||W||^2 per layer and option, from the quantizer alone (itself checked
    against hand-computed levels in test_options_quant.py), not from the estimators' helper."""
    from mpsearch.quant import quantize_weight

    rows = []
    for _name, module, kind in mpsearch.layers.iter_quantizable(model):
        w = module.weight.detach().float()
        rows.append([float((quantize_weight(w, mpsearch.parse_option(o), kind) - w).pow(2).sum() / w.pow(2).sum())
                     for o in table.options])
    return np.array(rows)


def test_lim_on_hf_bert_scores_every_encoder_layer():
    model, batches = tiny_bert()
    table = mpsearch.get_estimator("lim").estimate(model, batches, progress=False)
    scores = table.metadata["lim"]["scores"]
    assert list(scores) == ["encoder.layer.0", "encoder.layer.1"] and all(0 < s < 2 for s in scores.values())


def test_lim_needs_blocks():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(mpsearch.MpsearchError, match="lim needs a model made of sequential blocks"):
        mpsearch.get_estimator("lim").estimate(model, [torch.randn(2, 4)], progress=False)


# ------------------------------------------------------------------------------------ lrp
def test_lrp_epsilon_matches_a_hand_written_propagation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 0.1
    table = mpsearch.get_estimator("lrp", eps=eps, options="2,4").estimate(model, [(x, y)], progress=False)
    with torch.no_grad():
        z1 = model[0](x)
        a1 = torch.relu(z1)
        z2 = model[2](a1)
        r2 = F.one_hot(y, 3) * z2  # relevance of the target logit
        stab = lambda z: z + eps * torch.where(z >= 0, 1.0, -1.0)  # noqa: E731
        r_a1 = a1 * ((r2 / stab(z2)) @ model[2].weight)  # LRP-eps through layer 2
        r_z1 = r_a1  # identity rule through the ReLU: this is what arrives at layer 1's output
    want = np.array([float(r_z1.abs().sum()), float(r2.abs().sum())])
    share = table.metadata["lrp"]["share"]
    assert [share["0"], share["2"]] == pytest.approx((want / want.sum()).tolist(), rel=1e-5)
    rel = _relative_errors(model, table)
    np.testing.assert_allclose(_damage(table), (want / want.sum())[:, None] * rel, rtol=1e-5)


def test_lrp_attention_rules():
    model, batches = lm_batches()
    grad = mpsearch.get_estimator("lrp").estimate(model, batches, progress=False).metadata["lrp"]["share"]
    ah = mpsearch.get_estimator("lrp", attention="ah").estimate(model, batches, progress=False).metadata["lrp"]["share"]
    assert sum(grad.values()) == pytest.approx(1.0) and sum(ah.values()) == pytest.approx(1.0)
    assert grad["layers.0.q"] > 0 and grad["layers.0.k"] > 0
    assert ah["layers.0.q"] == 0 and ah["layers.0.k"] == 0 and ah["layers.0.v"] > 0


def test_lrp_on_hf_bert_embedding_target():
    model, batches = tiny_bert()
    table = mpsearch.get_estimator("lrp").estimate(model, batches, progress=False)
    share = table.metadata["lrp"]["share"]
    assert len(share) == 12 and sum(share.values()) == pytest.approx(1.0) and min(share.values()) > 0


def test_lrp_label_target_needs_labels():
    model, batches = lm_batches()
    with pytest.raises(mpsearch.MpsearchError, match="lrp relevance='label' needs batches with labels"):
        mpsearch.get_estimator("lrp", relevance="label").estimate(model, batches, progress=False)


# ---------------------------------------------------------------------------------- cache
class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("name, kw, unit", [
    ("hessian", {"probes": 12, "min_probes": 12, "cache_every": 0}, "hvps"),
    ("fisher", {"chunk_size": 2, "cache_every": 0}, "backward_passes"),
    ("output-distance", {"cache_every": 0}, "suffix_passes"),
    ("response", {"cache_every": 0, "probes": "int2,int4,int8"}, "suffix_passes"),
    ("lrp", {}, "backward_passes"),
    ("lim", {}, "forward_passes"),
])
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, name, kw, unit):
    model, batches = cnn_batches()
    est = mpsearch.get_estimator(name, cache_dir=str(tmp_path), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EstimatorWarning)
        whole = mpsearch.get_estimator(name, **kw).estimate(model, batches, progress=False)
        real_save = cache_mod.Checkpoint.save
        calls = {"n": 0}

        def save_then_die(self, state, *, force=False):
            real_save(self, state, force=force)
            calls["n"] += 1
            if calls["n"] == 3 if name not in ("lrp", "lim") else calls["n"] == 1:
                raise _Interrupt

        monkeypatch.setattr(cache_mod.Checkpoint, "save", save_then_die)
        with pytest.raises(_Interrupt):
            est.estimate(model, batches, progress=False)
        monkeypatch.setattr(cache_mod.Checkpoint, "save", real_save)
        resumed = est.estimate(model, batches, progress=False)
        again = est.estimate(model, batches, progress=False)
    np.testing.assert_allclose(_damage(resumed), _damage(whole), rtol=1e-9, atol=1e-15)
    assert 0 < resumed.metadata["cost"][unit] < whole.metadata["cost"][unit]
    assert "resumed_after_seconds" in resumed.metadata["cost"]
    assert again.metadata["cost"]["from_cache"] is True
    np.testing.assert_array_equal(_damage(again), _damage(resumed))


def test_cache_key_changes_with_settings_model_and_data(tmp_path):
    model, batches = cnn_batches()
    mpsearch.get_estimator("lim", cache_dir=str(tmp_path)).estimate(model, batches, progress=False)
    mpsearch.get_estimator("lim", cache_dir=str(tmp_path), options="2,4").estimate(model, batches, progress=False)
    mpsearch.get_estimator("lim", cache_dir=str(tmp_path)).estimate(model, batches[:1], progress=False)
    with torch.no_grad():
        model[0].weight.mul_(2)
    t = mpsearch.get_estimator("lim", cache_dir=str(tmp_path)).estimate(model, batches, progress=False)
    assert len(list(tmp_path.glob("lim-*.pt"))) == 4 and "from_cache" not in t.metadata["cost"]


# ------------------------------------------------------------------------------------ CLI
def test_cli_estimate_with_params(tmp_path, capsys):
    from pathlib import Path

    from mpsearch.cli import main

    models = Path(__file__).parent / "core_models.py"
    out = tmp_path / "t.csv"
    code = main(["estimate", "--model", f"{models}:digits_mlp", "--data", f"{models}:digits_calib",
                 "--estimator", "hessian", "--param", "probes=6", "--param", "min_probes=3", "--seed", "3",
                 "--no-progress", "-o", str(out)])
    assert code == 0
    table = mpsearch.CostTable.read(out)
    assert table.metadata["params"]["probes"] == 6 and table.metadata["params"]["seed"] == 3
    assert "damage_std" in table.frame and set(table.metadata["uncertainty"]["trace"]) == set(table.layers)
    code = main(["estimate", "--model", f"{models}:digits_mlp", "--data", f"{models}:digits_calib",
                 "--estimator", "fisher", "--param", "chunk=4", "-o", str(tmp_path / "f.csv")])
    assert code == 2 and "has no setting 'chunk' (did you mean 'chunk_size'?)" in capsys.readouterr().err


def test_fisher_vmap_runs_a_tied_causal_lm_with_an_attention_mask_and_equals_the_loop():
    """transformers' mask shortcut is data-dependent (vmap refused it) and tied weights were given to
    functional_call twice (refused): both ran the slow loop with a warning before."""
    from mpsearch import zoo

    model = zoo.random_llama("tiny", tie_word_embeddings=True)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimatorWarning)
        vm = mpsearch.get_estimator("fisher", per_sample="vmap", chunk_size=2, options="4,8").estimate(
            model, batches, progress=False)
    lp = mpsearch.get_estimator("fisher", per_sample="loop", chunk_size=2, options="4,8").estimate(
        model, batches, progress=False)
    assert "lm_head" in vm.layers and vm.metadata["cost"]["per_sample"] == "vmap"
    np.testing.assert_allclose(_damage(vm), _damage(lp), rtol=1e-4)
    assert _damage(vm).min() > 0


def test_an_estimators_device_setting_names_where_the_model_is():
    """``device`` used to move the inputs but never the model; a model elsewhere is now refused in one
    line (before any forward pass), and a device that matches runs as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    data = [torch.randn(4, 8)]
    same = mpsearch.get_estimator("weight-error", options="2,4", device="cpu").estimate(model, data)
    plain = mpsearch.get_estimator("weight-error", options="2,4").estimate(model, data)
    assert np.allclose(_damage(same), _damage(plain))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for est in ("weight-error", "output-distance"):
        with pytest.raises(mpsearch.MpsearchError, match=r"device='meta', but the model's parameters are on cpu: move"):
            mpsearch.get_estimator(est, options="2,4", device="meta").estimate(model, data)
    with pytest.raises(mpsearch.MpsearchError, match="is not a torch device"):
        mpsearch.get_estimator("weight-error", options="2,4", device="gpu9").estimate(model, data)
    assert calls == []


def _sampled_label_fisher(model, batches, chunk, layers, options, output="logits", seed=0):
    """The sampled-label Fisher written out as fisher first computed it: one forward pass over each
    chunk for its labels (torch.multinomial of softmax(logits), or the embedding plus Gaussian noise,
    from the chunk's generator), then one backward pass per sample, F = mean_n g_n^2, damage = sum F dW^2."""
    from mpsearch.sensitivity.base import probe_seed

    weights = [model.get_submodule(n).weight for n in layers]
    sums, count = [torch.zeros(w.shape, dtype=torch.float64) for w in weights], 0
    for bi, batch in enumerate(batches):
        n = len(batch["input_ids"])
        for ci in range(-(-n // chunk)):
            part = {k: v[ci * chunk:(ci + 1) * chunk] for k, v in batch.items()}
            gen = torch.Generator().manual_seed(probe_seed(seed, bi, ci))
            with torch.no_grad():
                raw = model(**part)
            if output == "embedding":
                target = raw.last_hidden_state + torch.randn(raw.last_hidden_state.shape, generator=gen)
            else:
                probs = F.softmax(raw.logits.reshape(-1, raw.logits.shape[-1]), -1)
                target = torch.multinomial(probs, 1, generator=gen).reshape(raw.logits.shape[:-1])
            for i in range(len(part["input_ids"])):
                out = model(**{k: v[i:i + 1] for k, v in part.items()})
                if output == "embedding":
                    loss = 0.5 * (out.last_hidden_state - target[i:i + 1]).pow(2).sum()
                else:
                    loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), target[i:i + 1].reshape(-1))
                for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                    s += g.double().pow(2)
                count += 1
    return np.array([[float((s / count * quantization_error(w.double(), mpsearch.parse_option(o), "linear").pow(2)).sum())
                      for o in options] for s, w in zip(sums, weights)])


@pytest.mark.parametrize("per_sample", ["loop", "vmap"])
def test_fisher_sampled_labels_equal_one_labelling_pass_per_chunk(per_sample):
    """The loop samples each sample's labels from its own forward pass (no labelling pass over the
    chunk, a quarter of its time on SmolLM2 on a CPU: experiments/fisher_cpu.md) with the chunk's
    random draws: the labels, and so the table, are those of the labelling pass over the chunk."""
    from mpsearch import zoo

    model = zoo.random_llama("tiny", tie_word_embeddings=True)
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)},
               {"input_ids": ids.flip(0)[:3], "attention_mask": torch.ones_like(ids[:3])}]
    table = mpsearch.get_estimator("fisher", per_sample=per_sample, chunk_size=2, options="4,8", seed=3).estimate(
        model, batches, progress=False)
    assert "lm_head" in table.layers and table.metadata["cost"]["per_sample"] == per_sample
    want = _sampled_label_fisher(model, batches, 2, table.layers, ["int4", "int8"], seed=3)
    np.testing.assert_allclose(_damage(table), want, rtol=1e-5)
    labelling = 3 + 2 if per_sample == "vmap" else 0  # one pass over each chunk (3 + 2 chunks of 2): vmap only
    assert table.metadata["cost"]["backward_passes"] == 8
    assert table.metadata["cost"]["forward_passes"] == 8 + labelling


def test_fisher_loop_sampled_embedding_targets_equal_one_labelling_pass_per_chunk():
    model, batches = tiny_bert()
    table = mpsearch.get_estimator("fisher", output="embedding", per_sample="loop", chunk_size=2,
                                   options="4,8").estimate(model, batches, progress=False)
    want = _sampled_label_fisher(model, batches, 2, table.layers, ["int4", "int8"], output="embedding")
    np.testing.assert_allclose(_damage(table), want, rtol=1e-5)
