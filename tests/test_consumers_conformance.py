"""The shipped consumer conformance suite (mpsearch.testing.consumers) over every built-in format and
target, over a toy format plugin (one declaration plus its fake quantizer), and against broken toy
formats and targets that it must catch."""

import pytest
import toy_plugins as toy

from mpsearch.formats import format_names, get_format
from mpsearch.formats.ggml_iq import IqFormat
from mpsearch.targets import target_names
from mpsearch.testing import check_format, check_target
from mpsearch.testing.consumers import check_export_round_trip, format_checks, target_checks

SLOW_QUANTIZER = ("llama.cpp's i-quants search a lattice grid per block: seconds per matrix on CPU; "
                  "their rounding is checked against llama.cpp in tests/test_formats_ggml_iq.py")


def _quantizer_param(name):
    slow = isinstance(get_format(name), IqFormat)
    return pytest.param(name, marks=pytest.mark.skip(reason=SLOW_QUANTIZER) if slow else ())


@pytest.mark.parametrize("name", format_names())
def test_builtin_format_declaration_sizes_and_shape_rules(name):
    check_format(name, quantizer=False)


@pytest.mark.parametrize("name", [_quantizer_param(n) for n in format_names()])
def test_builtin_format_quantizer(name):
    check_format(name)


@pytest.mark.parametrize("name", target_names())
def test_builtin_target(name):
    check_target(name)


def test_the_suite_lists_its_checks():
    assert [c.__name__ for c in format_checks()] == ["check_declaration", "check_sizes", "check_shape_rules",
                                                     "check_quantizer", "check_reference"]
    assert len(target_checks()) == 4


def test_a_toy_format_plugin_passes():
    fmt = toy.ToyInt4()
    check_format(fmt)
    assert fmt.bits_per_weight(4096) == 4.5 and fmt.max_levels() == 16


@pytest.mark.parametrize("broken, match", [
    (toy.ToyNominalBitsPerWeight, r"bits_per_weight\(256\) = 4.0 but a 4096 x 256 matrix takes 4.5 bits"),
    (toy.ToyFiveBitLevels, r"a group of 64 weights holds \d+ distinct values, more than max_levels\(\) = 16"),
    (toy.ToyFalselyIdempotent, r"declares idempotent but quantize\(quantize\(W\)\) != quantize\(W\)"),
    (toy.ToyNoShapeRule, r"check_shape accepts 64x257 but quantize fails on it"),
    (toy.ToyTensorScale, r"declares rows_independent but rows 32..63 quantized alone differ"),
])
def test_the_format_checks_catch_broken_formats(broken, match):
    with pytest.raises(AssertionError, match="^toy-int4-g64: " + match):
        check_format(broken())


def test_the_exactness_hook_compares_with_the_consumers_own_rounding():
    from consumer_oracles import reference

    check_format("w4a16-g128", reference=lambda w: reference("w4a16-g128", w))
    with pytest.raises(AssertionError, match=r"^w4a16-g128: differs from the consumer's own rounding"):
        check_format("w4a16-g128", reference=lambda w: reference("w4a16-g32", w))


def test_a_toy_target_passes_and_broken_ones_are_caught():
    check_target(toy.ToyTarget())
    with pytest.raises(AssertionError, match=r"^toy-target: offers q4_K to model\.layers\.0\.mlp\.down_proj "
                                             r"\(256x640\), a shape its format refuses$"):
        check_target(toy.ToyTargetIgnoresShapes())
    with pytest.raises(AssertionError, match=r"^toy-target: recipe 'uniform-q6_K' uses 'q6_K', not one of its"):
        check_target(toy.ToyTargetRecipeOutsideOptions())


def test_the_round_trip_catches_an_exporter_that_reads_back_other_options(monkeypatch):
    from mpsearch.export.torchao_config import TorchaoExporter

    real = TorchaoExporter.read

    def read_as_int8(self, doc, layers, source):
        plan = real(self, doc, layers, source)
        first = plan.layers[0]
        plan.options[first] = {**plan.options[first], "bits": 8, "name": "int8wo", "fmt": "int8wo"}
        return plan

    monkeypatch.setattr(TorchaoExporter, "read", read_as_int8)
    with pytest.raises(AssertionError, match=r"^torchao: torchao read back"):
        check_export_round_trip("torchao")
