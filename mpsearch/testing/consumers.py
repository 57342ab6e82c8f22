"""The consumer conformance suite: every check takes a consumer format (or a target) and raises
``AssertionError`` naming what is wrong, as the solver suite does.

Formats (:class:`mpsearch.formats.Format`, by instance or registered name), :func:`check_format`:

- the declaration: a name usable in an option list, nominal ``bits``, ``act_bits``, a consumer, a
  ``level_group`` and ``max_levels()`` that make sense;
- sizes: ``size_bits`` is a whole number of bytes, at least the nominal bits of every weight, grows
  with the matrix, and ``bits_per_weight`` is the storage per weight of a long matrix; where the
  format writes the consumer's bytes (``to_bytes``), their count is ``size_bits / 8``;
- shape rules: a refusal is one line naming the dimension it refuses, and a shape that is not
  refused is one the quantizer takes (and ``size_bits`` counts);
- the fake quantizer (``quantizer=True``): float32 in, float32 out, same shape, finite,
  deterministic, the input left alone, a zero row stays zero, the error no larger than the
  weights' own norm (all zeros is the worst a rounding may give: torchao's symmetric 1-bit does),
  at most ``max_levels()`` distinct values per ``level_group``, rows quantized alone equal the same
  rows quantized together where ``rows_independent`` says so, ``quantize(quantize(W)) ==
  quantize(W)`` exactly where the format declares ``idempotent``, and ``quantize_act`` the identity
  for weight-only formats;
- exactness (``reference``): a callable giving the consumer's own dequantized values of a matrix;
  the fake quantizer must equal it bit for bit on the sample matrices.

Targets (:class:`mpsearch.targets.Target`, by instance or registered name), :func:`check_target`:
its options parse and its default sets are among them, where formats declare the target
(:class:`mpsearch.formats.Offer`) its options are exactly those formats, an option of another
consumer is refused,
``legal_options`` is exactly the options whose ``option_reason`` is ``None`` (and never offers a
shape the option's format refuses), ``plans_layer`` agrees with ``unplanned_reason``, its recipes
use only its options, legally, and its exporter writes a plan of its options (read back to the same
options where the exporter has an importer: :func:`check_export_round_trip`).

With pytest::

    from mpsearch.testing.consumers import check_format, check_target
    check_format(MyFormat("myfmt-int4", ...), reference=my_consumer_dequantize)
"""

from __future__ import annotations

import numbers

from ..errors import MpsearchError
from ..export import export_plan, get_exporter, import_plan
from ..formats import Format, format_names, get_format, offered_by
from ..layers import Layer
from ..options import parse_option
from ..plan import BitPlan
from ..targets import get_target

#: shapes tried, in order, for one the format stores (out_channels, in_features)
_COMMON_SHAPES = ((64, 256), (64, 512), (64, 1024), (128, 2048), (64, 4096))


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------

def _format(fmt):
    if isinstance(fmt, Format):
        return fmt
    found = get_format(fmt)
    assert found is not None, f"no format called {fmt!r} is registered"
    return found


def _legal_shape(fmt):
    for shape in _COMMON_SHAPES:
        if fmt.check_shape(*shape) is None:
            return shape
    raise AssertionError(f"{fmt.name}: refuses every common shape {list(_COMMON_SHAPES)}")


def _samples(shape, seeds=3):
    """Float32 matrices of ``shape``: Gaussian at three scales, with outliers and a zero row."""
    import torch

    out = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        w = torch.randn(*shape, generator=g) * (0.02, 1.0, 7.0)[seed % 3]
        w[0, : max(1, shape[1] // 40)] *= 25.0  # outliers in the first row
        w[-1] = 0.0
        out.append(w)
    return out


def check_declaration(fmt, **_):
    fmt = _format(fmt)
    name = fmt.name
    assert isinstance(name, str) and name and name == name.strip() and not any(c in name for c in ", =:"), \
        f"format name {name!r}: a non-empty word usable in an option list (no spaces, ',', '=' or ':')"
    assert isinstance(fmt.bits, int) and 1 <= fmt.bits <= 16, f"{name}: bits={fmt.bits!r} is not 1..16"
    assert isinstance(fmt.act_bits, int) and 1 <= fmt.act_bits <= 16, f"{name}: act_bits={fmt.act_bits!r}"
    assert isinstance(fmt.consumer, str) and fmt.consumer, f"{name}: no consumer named"
    assert fmt.level_group is None or (isinstance(fmt.level_group, int) and fmt.level_group > 0), \
        f"{name}: level_group={fmt.level_group!r} is neither None nor a positive int"
    levels = fmt.max_levels()
    assert isinstance(levels, int) and 2 <= levels <= 2 ** 16, f"{name}: max_levels()={levels!r}"
    assert isinstance(getattr(fmt, "idempotent", False), bool), f"{name}: idempotent is not a bool"


def check_sizes(fmt, **_):
    fmt = _format(fmt)
    name = fmt.name
    o, i = _legal_shape(fmt)
    shapes = [(o, i), (2 * o, i), (o, 2 * i), (4096, i)]
    sizes = {}
    for a, b in shapes:
        if fmt.check_shape(a, b) is not None:
            continue
        s = fmt.size_bits(a, b)
        assert isinstance(s, numbers.Integral) and not isinstance(s, bool), \
            f"{name}: size_bits({a}, {b}) = {s!r} is not a whole number of bits"
        assert s % 8 == 0, f"{name}: size_bits({a}, {b}) = {s} is not a whole number of bytes"
        assert s >= a * b * fmt.bits, \
            f"{name}: size_bits({a}, {b}) = {s} stores fewer than the nominal {fmt.bits} bits per weight"
        sizes[(a, b)] = int(s)
    for bigger in ((2 * o, i), (o, 2 * i)):
        if bigger in sizes:
            assert sizes[bigger] > sizes[(o, i)], \
                f"{name}: size_bits{bigger} = {sizes[bigger]} is not more than size_bits{(o, i)} = {sizes[(o, i)]}"
    for width in (i, 2 * i, 4096):
        if fmt.check_shape(4096, width) is not None:
            continue
        bpw, long = fmt.bits_per_weight(width), fmt.size_bits(4096, width) / (4096 * width)
        assert abs(bpw - long) <= 5e-3 * long, \
            f"{name}: bits_per_weight({width}) = {bpw} but a 4096 x {width} matrix takes {long} bits per weight"


def _refused(fmt, a, b):
    reason = fmt.check_shape(a, b)
    if reason is None:
        return False
    assert isinstance(reason, str) and reason.strip() and "\n" not in reason, \
        f"{fmt.name}: check_shape({a}, {b}) gave {reason!r}, not one line of reason"
    assert str(b) in reason or str(a) in reason, \
        f"{fmt.name}: check_shape({a}, {b}) refuses without naming the dimension: {reason!r}"
    return True


def check_shape_rules(fmt, quantizer=True, **_):
    import torch

    fmt = _format(fmt)
    o, i = _legal_shape(fmt)
    probes = [(o, i + 1), (o, i - 1), (o, i + i // 2), (o + 1, i), (o, 100), (o, 33), (3, i), (o, 7)]
    for a, b in probes:
        if _refused(fmt, a, b):
            continue
        assert fmt.size_bits(a, b) > 0, f"{fmt.name}: accepts {a}x{b} but size_bits({a}, {b}) is not positive"
        if not quantizer:
            continue
        w = _samples((a, b), seeds=1)[0]
        try:
            q = fmt.quantize(w)
        except Exception as exc:  # noqa: BLE001 -- any failure is the finding
            raise AssertionError(f"{fmt.name}: check_shape accepts {a}x{b} but quantize fails on it: "
                                 f"{type(exc).__name__}: {exc}") from None
        assert isinstance(q, torch.Tensor) and tuple(q.shape) == (a, b) and bool(torch.isfinite(q).all()), \
            f"{fmt.name}: check_shape accepts {a}x{b} but quantize gives no finite {a}x{b} matrix"


def _check_levels(fmt, q):
    """At most ``max_levels()`` distinct values in each ``level_group`` of ``q``'s rows (the whole
    row if None; a last, shorter group is not counted)."""
    group = fmt.level_group or q.shape[1]
    cols = q.shape[1] - q.shape[1] % group
    blocks = q[:, :cols].reshape(-1, group)
    worst = max(len(set(row.tolist())) for row in blocks)
    assert worst <= fmt.max_levels(), \
        f"{fmt.name}: a group of {group} weights holds {worst} distinct values, more than " \
        f"max_levels() = {fmt.max_levels()}"


def check_quantizer(fmt, quantizer=True, **_):
    import torch

    fmt = _format(fmt)
    if not quantizer:
        return
    name = fmt.name
    o, i = _legal_shape(fmt)
    for w in _samples((o, i)):
        before = w.clone()
        q = fmt.quantize(w)
        assert torch.equal(w, before), f"{name}: quantize changed its input"
        assert isinstance(q, torch.Tensor) and q.dtype == torch.float32 and tuple(q.shape) == (o, i), \
            f"{name}: quantize of a float32 {o}x{i} matrix gave " \
            f"{getattr(q, 'dtype', type(q))} {tuple(getattr(q, 'shape', ()))}"
        assert bool(torch.isfinite(q).all()), f"{name}: quantize gave NaN or Inf"
        assert torch.equal(q, fmt.quantize(w)), f"{name}: quantize is not deterministic"
        assert not q[-1].any(), f"{name}: a zero row does not stay zero"
        err, size = float((q - w).norm()), float(w.norm())
        # rounding every weight to 0 is the worst a quantizer may do (torchao's symmetric 1-bit does)
        assert err <= size * (1 + 1e-6), \
            f"{name}: the rounding error {err:.4g} exceeds the weights' own norm {size:.4g}"
        _check_levels(fmt, q)
        if fmt.rows_independent:
            half = next((k for k in (o // 2, o // 4, 32, 16, 8, 1)
                         if 0 < k < o and fmt.check_shape(k, i) is None), None)
            for rows in ((slice(0, half), slice(half, o)) if half is not None else ()):
                if fmt.check_shape(rows.stop - rows.start, i) is None:
                    assert torch.equal(fmt.quantize(w[rows].clone()), q[rows]), \
                        f"{name}: declares rows_independent but rows {rows.start}..{rows.stop - 1} " \
                        f"quantized alone differ from the same rows quantized with the others"
        if getattr(fmt, "idempotent", False):
            assert torch.equal(fmt.quantize(q), q), \
                f"{name}: declares idempotent but quantize(quantize(W)) != quantize(W) " \
                f"(max difference {float((fmt.quantize(q) - q).abs().max()):.3g})"
        to_bytes = getattr(fmt, "to_bytes", None)
        if callable(to_bytes):
            n = to_bytes(w).numel()
            assert 8 * n == fmt.size_bits(o, i), \
                f"{name}: to_bytes writes {n} bytes for {o}x{i}, size_bits says {fmt.size_bits(o, i) / 8:g}"
    x = _samples((4, i), seeds=1)[0]
    xq = fmt.quantize_act(x)
    if fmt.quantizes_activations:
        assert tuple(xq.shape) == (4, i) and bool(torch.isfinite(xq).all()), \
            f"{name}: quantize_act gave no finite matrix of its input's shape"
    else:
        assert torch.equal(xq, x), f"{name}: a weight-only format (act_bits 16) changes activations"


def check_reference(fmt, quantizer=True, reference=None, **_):
    """The exactness hook: ``reference(matrix)`` is the consumer's own dequantized matrix."""
    import torch

    fmt = _format(fmt)
    if reference is None or not quantizer:
        return
    for w in _samples(_legal_shape(fmt)):
        ours, theirs = fmt.quantize(w), reference(w.clone())
        assert torch.equal(ours, theirs.to(ours.dtype)), \
            f"{fmt.name}: differs from the consumer's own rounding (max difference " \
            f"{float((ours - theirs.to(ours.dtype)).abs().max()):.3g})"


_FORMAT_CHECKS = [check_declaration, check_sizes, check_shape_rules, check_quantizer, check_reference]


def format_checks() -> list:
    """The format checks, each ``check(fmt, quantizer=True, reference=None)``."""
    return list(_FORMAT_CHECKS)


def check_format(fmt, *, quantizer: bool = True, reference=None) -> None:
    """Run every format check on ``fmt`` (a :class:`~mpsearch.formats.Format` or a registered name).

    ``quantizer=False`` leaves out the checks that run the fake quantizer (for formats whose
    quantizer needs an importance matrix or is too slow for a test); ``reference``: a callable
    ``matrix -> the consumer's dequantized matrix`` that the fake quantizer must equal exactly.
    """
    for check in _FORMAT_CHECKS:
        check(fmt, quantizer=quantizer, reference=reference)


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------

def _target(target):
    return get_target(target)


def probe_layers(blocks: int = 2, hidden: int = 256, intermediate: int = 640):
    """A Llama-like set of :class:`~mpsearch.layers.Layer` objects (embedding, attention and MLP
    projections, an untied ``lm_head``) whose shapes exercise the shape rules: the MLP's
    ``down_proj`` rows (``intermediate`` = 640) are not a multiple of 256."""
    def lin(name, out, inp, kind="linear"):
        return Layer(name=name, kind=kind, shape=(out, inp), params=out * inp, out_channels=out, in_features=inp)

    out = [lin("model.embed_tokens", 512, hidden, "embedding")]
    for b in range(blocks):
        p = f"model.layers.{b}"
        out += [lin(f"{p}.self_attn.{x}_proj", hidden, hidden) for x in "qkvo"]
        out += [lin(f"{p}.mlp.gate_proj", intermediate, hidden), lin(f"{p}.mlp.up_proj", intermediate, hidden),
                lin(f"{p}.mlp.down_proj", hidden, intermediate)]
    return out + [lin("lm_head", 512, hidden)]


def _foreign_option(target):
    """A consumer format option the target does not execute (another consumer's)."""
    mine = {getattr(parse_option(o).format, "consumer", None) for o in target.options}
    return next(n for n in format_names() if n not in target.options and get_format(n).consumer not in mine)


def check_target_options(target, **_):
    t = _target(target)
    name = t.name
    assert isinstance(name, str) and name, f"target {t!r}: no name"
    opts = tuple(t.options)
    assert opts and all(isinstance(o, str) for o in opts), f"{name}: options must be a non-empty tuple of names"
    assert len(set(opts)) == len(opts), f"{name}: an option is listed twice"
    for o in opts:
        try:
            parse_option(o)
        except MpsearchError as exc:
            raise AssertionError(f"{name}: its option {o!r} does not parse: {exc}") from None
    _check_declared(t, opts)
    for label, subset in (("default_options", t.default_options), ("imatrix_default_options",
                                                                   t.imatrix_default_options or ())):
        extra = [o for o in subset if o not in opts]
        assert not extra, f"{name}: {label} {extra} are not among its options"
    for imatrix in (False, True):
        got = [o.name for o in t.parsed_options(imatrix=imatrix)]
        assert got, f"{name}: an empty default option set (imatrix={imatrix})"
        assert set(got) <= set(opts) or name == "mpsearch", f"{name}: default options {got} not among its options"
    assert [o.name for o in t.parsed_options(list(opts), imatrix=True)] == list(opts), \
        f"{name}: parsed_options of its own option list does not give that list back"
    foreign = _foreign_option(t)
    try:
        t.parsed_options([foreign], imatrix=True)
    except MpsearchError:
        pass
    else:
        raise AssertionError(f"{name}: accepts {foreign!r}, an option of another consumer")
    rows = t.describe()
    assert [r["option"] for r in rows] == list(opts), f"{name}: describe() is not one row per option"


def _check_declared(t, opts):
    """Where formats declare the target (``Offer(t.name)``), its format options are exactly those, in
    their order: an option list spelled out beside the declarations drifts from them."""
    declared = [n for n, _ in offered_by(t.name)]
    if not declared:
        return
    listed = [o for o in opts if o != "keep"]
    undeclared = [o for o in listed if o not in declared]
    assert not undeclared, f"{t.name}: options {undeclared} are not formats that declare Offer({t.name!r}) " \
                           f"(mpsearch.formats.offered_by); declare them in the format's offers"
    assert listed == declared, f"{t.name}: options {listed} are not the formats that declare it, in their " \
                               f"order: {declared}"


def check_target_rules(target, layers=None, **_):
    t = _target(target)
    layers = probe_layers() if layers is None else layers
    options = t.parsed_options(list(t.options), imatrix=True)
    offered = 0
    for lay in layers:
        reasons = {o.name: t.option_reason(lay, o) for o in options}
        for opt, why in reasons.items():
            assert why is None or (isinstance(why, str) and why.strip()), \
                f"{t.name}: option_reason({lay.name}, {opt}) = {why!r} is neither None nor a reason"
        legal = [o.name for o in t.legal_options(lay, options)]
        assert legal == [n for n in reasons if reasons[n] is None], \
            f"{t.name}: legal_options({lay.name}) = {legal} disagrees with option_reason"
        for o in options:
            fmt = o.format
            if fmt is not None and fmt.check_shape(lay.out_channels, lay.in_features) is not None:
                assert reasons[o.name] is not None, \
                    f"{t.name}: offers {o.name} to {lay.name} ({lay.out_channels}x{lay.in_features}), " \
                    f"a shape its format refuses"
        why_not = t.unplanned_reason(lay)
        assert why_not is None or (isinstance(why_not, str) and why_not.strip()), \
            f"{t.name}: unplanned_reason({lay.name}) = {why_not!r}"
        assert t.plans_layer(lay) == (why_not is None), f"{t.name}: plans_layer and unplanned_reason disagree"
        offered += t.plans_layer(lay) and any(n != "keep" for n in legal)
    assert offered, f"{t.name}: no planned probe layer is offered any quantized option"


def check_target_recipes(target, layers=None, **_):
    t = _target(target)
    layers = probe_layers() if layers is None else layers
    planned = [lay for lay in layers if t.plans_layer(lay)]
    by_name = {lay.name: lay for lay in planned}
    for imatrix in (False, True):
        recipes = t.recipes(planned, imatrix=imatrix)
        assert isinstance(recipes, dict), f"{t.name}: recipes() is not a mapping"
        for rname, choice in recipes.items():
            unknown = set(choice) - set(by_name)
            assert not unknown, f"{t.name}: recipe {rname!r} names layers it was not given: {sorted(unknown)[:3]}"
            for lay_name, opt in choice.items():
                assert opt in t.options, f"{t.name}: recipe {rname!r} uses {opt!r}, not one of its options"

                why = t.option_reason(by_name[lay_name], parse_option(opt))
                assert why is None, f"{t.name}: recipe {rname!r} gives {lay_name} {opt!r}, which it refuses: {why}"


def check_export_round_trip(target, layers=None, **_):
    """The target's exporter writes a plan that uses every option it offers on the probe layers
    (round robin, ``keep`` included); where the exporter has an importer, the plan read back has
    the same option on every layer."""
    t = _target(target)
    if not t.exporter:
        return
    layers = probe_layers(blocks=8) if layers is None else layers
    planned = [lay for lay in layers if t.plans_layer(lay) and lay.kind != "embedding"]
    options = t.parsed_options(list(t.options), imatrix=True)
    choice, seen = {}, set()
    for k, lay in enumerate(planned):  # each layer the first legal option not used yet, then round robin
        legal = t.legal_options(lay, options)
        assert legal, f"{t.name}: no legal option for {lay.name}"
        choice[lay.name] = next((o for o in legal if o.name not in seen), legal[k % len(legal)])
        seen.add(choice[lay.name].name)
    plan = BitPlan(bits={n: o.bits for n, o in choice.items()}, options={n: o.to_dict() for n, o in choice.items()},
                   predicted={"damage": 1.0})
    exporter = get_exporter(t.exporter)
    try:
        doc = export_plan(plan, t.exporter, force=True)
    except MpsearchError as exc:
        raise AssertionError(f"{t.name}: its exporter {t.exporter!r} refuses a plan of its options "
                             f"{sorted(seen)}: {exc}") from None
    text = exporter.dumps(doc)
    assert isinstance(text, str) and text.strip(), f"{t.name}: {t.exporter} wrote an empty document"
    if not exporter.can_import:
        return
    back = import_plan(exporter.loads(text, "round trip"), t.exporter, layers=list(choice))
    got = {n: back.option(n).name for n in back.layers if n in choice}
    want = {n: parse_option(o.name).name for n, o in choice.items()}
    assert got == want, f"{t.name}: {t.exporter} read back " \
        f"{ {n: got.get(n) for n in want if got.get(n) != want[n]} } instead of " \
        f"{ {n: want[n] for n in want if got.get(n) != want[n]} }"


_TARGET_CHECKS = [check_target_options, check_target_rules, check_target_recipes, check_export_round_trip]


def target_checks() -> list:
    """The target checks, each ``check(target, layers=None)``."""
    return list(_TARGET_CHECKS)


def check_target(target, *, layers=None) -> None:
    """Run every target check (the exporter round trip included) on ``target`` (a
    :class:`~mpsearch.targets.Target` or a registered name); ``layers``: the probe layers
    (default :func:`probe_layers`)."""
    for check in _TARGET_CHECKS:
        check(target, layers=layers)
