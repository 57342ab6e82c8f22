"""torchao: a ``FqnToConfig`` of weight-only integer configs, as an object or as torchao's config JSON.

Every quantized layer gets ``IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=...,
mapping_type=...)`` (torchao ``quantization/quant_api.py``): it covers 1-8 bits, per-group
(``PerGroup(g)``) or per-output-channel (``PerAxis(0)``) scales, symmetric or asymmetric, on CPU and
GPU, for Linear and Conv2d weights. ``keep`` layers map to ``None`` (left as they are). Keys are the
exact module FQNs, which torchao matches before any ``re:`` pattern.

The JSON form is made of the objects ``torchao.core.config.config_to_dict`` writes (``{"_type",
"_version", "_data"}``, ``torchao/core/config.py``; the table once, without its legacy
``module_fqn_to_config`` copy), so ``config_from_dict(json.load(f))`` rebuilds the object; it is
written here without importing torchao. Apply it with
``quantize_(model, config, filter_fn=None)`` (torchao refuses a filter together with FqnToConfig).

The torchao formats of ``--target torchao`` are written as the configs their fake quantizers
reproduce: ``intx-B-gG[-asym]`` -> ``IntxWeightOnlyConfig(weight_dtype=torch.intB,
granularity=PerGroup(G), mapping_type=SYMMETRIC/ASYMMETRIC)`` with torchao's defaults for the rest
(``scale_dtype=None``: scales in the weight's dtype; ``UNPACKED_TO_INT8``; ``AFFINE`` qparams, so
a zero point per group, 0 for symmetric), and a format that declares its config
(:attr:`mpsearch.formats.Format.consumer_config`) as that config: ``int8wo`` ->
``Int8WeightOnlyConfig()`` (per row, float32 scales). mpsearch's own options (``int4-g32``...) get ``IntxWeightOnlyConfig`` as above,
``PerAxis(0)`` when per channel.

The importer reads this JSON or an ``FqnToConfig`` object, including configs written by hand:
``IntxWeightOnlyConfig``, ``Int4WeightOnlyConfig`` (4-bit, its ``group_size``, asymmetric) and
``Int8WeightOnlyConfig`` (8-bit per channel); ``re:`` keys and ``_default`` are resolved with
torchao's precedence (exact name, then the first fully-matching regex, then ``_default``) over the
layer names given. A config equal to the one written for a torchao format (above) reads back as
that format's option (``intx-4-g32``, ``int8wo``); any other as the integer option (``int4-g64``).
"""

from __future__ import annotations

import re

from .._quiet import preload_torchao
from ..formats import format_names, get_format
from ..options import KEEP, Option
from ..plan import BitPlan
from ._base import (consumer_config, expect, Exporter, ExportError, format_option, int_settings, need_layers,
                    plan_from_options)



def _granularity(opt: Option) -> dict:
    if opt.group_size is None:
        return {"_type": "PerAxis", "_version": 1, "_data": {"axis": 0}}
    return {"_type": "PerGroup", "_version": 1, "_data": {"group_size": opt.group_size}}


def _config_dict(opt: Option) -> dict | None:
    if opt.is_keep:
        return None
    declared = consumer_config(opt, "torchao")  # int8wo: Int8WeightOnlyConfig()
    return declared if declared is not None else _intx_dict(int_settings(opt))


def _intx_dict(opt: Option) -> dict:
    return {
        "_type": "IntxWeightOnlyConfig",
        "_version": 2,
        "_data": {
            "weight_dtype": {"_type": "torch.dtype", "_data": f"int{opt.bits}"},
            "granularity": _granularity(opt),
            "mapping_type": {"_type": "MappingType",
                             "_data": "SYMMETRIC" if opt.symmetric else "ASYMMETRIC"},
            "scale_dtype": None,
            "intx_packing_format": {"_type": "IntxPackingFormat", "_data": "UNPACKED_TO_INT8"},
            "intx_choose_qparams_algorithm": {"_type": "IntxChooseQParamsAlgorithm", "_data": "AFFINE"},
        },
    }


class TorchaoExporter(Exporter):
    """torchao ``FqnToConfig`` (JSON form; :func:`to_torchao_config` gives the object)."""

    name = "torchao"
    suffix = ".json"
    can_import = True
    consumers = ("torchao",)
    stacked_experts = ("torchao's IntxWeightOnlyConfig refuses them (\"only works for 2-d and 4-d Tensors\", "
                       "torchao 0.18); export with --to llama.cpp or llm-compressor")

    def build(self, plan: BitPlan) -> dict:
        table = {lay: _config_dict(plan.option(lay)) for lay in plan.layers}
        # config_to_dict also repeats the table as the legacy "module_fqn_to_config"; FqnToConfig
        # fills that alias itself, so the file carries the table once.
        return {"_type": "FqnToConfig", "_version": 1, "_data": {"fqn_to_config": table}}

    def read(self, doc, layers, source) -> BitPlan:
        if type(doc).__name__ in ("FqnToConfig", "ModuleFqnToConfig"):
            preload_torchao()
            from torchao.core.config import config_to_dict

            doc = config_to_dict(doc)
        if not isinstance(doc, dict) or doc.get("_type") not in ("FqnToConfig", "ModuleFqnToConfig"):
            raise ExportError(
                f"{source}: not a torchao FqnToConfig (expected a config_to_dict JSON object with "
                f"\"_type\": \"FqnToConfig\", got {type(doc).__name__} "
                f"{doc.get('_type') if isinstance(doc, dict) else ''})"
            )
        data = expect(doc.get("_data") or {}, dict, "'_data'", source)
        table = data.get("fqn_to_config") or data.get("module_fqn_to_config") or {}
        expect(table, dict, "'fqn_to_config'", source)
        for key in table:
            expect(key, str, "an 'fqn_to_config' key", source)
        if not table:
            raise ExportError(f"{source}: the FqnToConfig has an empty 'fqn_to_config'")
        parsed = {key: _read_config(cfg, key, source) for key, cfg in table.items()}
        exact = {k: v for k, v in parsed.items() if not k.startswith("re:") and k != "_default"}
        patterned = [k for k in parsed if k.startswith("re:") or k == "_default"]
        if not patterned and layers is None:
            return plan_from_options(exact, self.name, source)
        names = need_layers(layers, self.name, source) if patterned else list(layers)
        options = {}
        for name in names:
            if name in exact:
                options[name] = exact[name]
                continue
            hit = next((k for k in patterned if k.startswith("re:") and re.fullmatch(k[3:], name)), None)
            if hit is None and "_default" in parsed:
                hit = "_default"
            options[name] = parsed[hit] if hit else KEEP
        return plan_from_options(options, self.name, source)


def _read_config(cfg, key: str, source: str) -> Option:
    if cfg is None:
        return KEEP
    opt = _read_int_config(cfg, key, source)
    # the torchao format whose exported config this is, exactly, if there is one

    for name in format_names():
        fmt = get_format(name)
        if fmt.consumer == "torchao" and fmt.bits == opt.bits:
            candidate = format_option(name)
            if _config_dict(candidate) == cfg:
                return candidate
    return opt


def _read_int_config(cfg, key: str, source: str) -> Option:
    expect(cfg, dict, f"the config of {key!r}", source)
    kind = cfg.get("_type")
    data = expect(cfg.get("_data") or {}, dict, f"'_data' of the config of {key!r}", source)
    for field in ("weight_dtype", "granularity", "mapping_type"):
        if data.get(field) is not None:
            sub = expect(data[field], dict, f"{field!r} of {key!r} (a {{'_type', '_data'}} object)", source)
            if field == "granularity" and sub.get("_data") is not None:
                expect(sub["_data"], dict, f"'granularity._data' of {key!r}", source)
    if data.get("group_size") is not None:  # torchao's own Int8WeightOnlyConfig() writes None
        expect(data["group_size"], int, f"'group_size' of {key!r}", source)
    try:
        if kind == "IntxWeightOnlyConfig":
            dtype = (data.get("weight_dtype") or {}).get("_data", "int8")
            bits = int(str(dtype).removeprefix("int"))
            gran = data.get("granularity") or {"_type": "PerAxis"}
            group = gran["_data"]["group_size"] if gran.get("_type") == "PerGroup" else None
            mapping = (data.get("mapping_type") or {}).get("_data", "SYMMETRIC")
            return Option(bits, group_size=group, symmetric=mapping != "ASYMMETRIC")
        if kind == "Int4WeightOnlyConfig":
            return Option(4, group_size=int(data.get("group_size", 128)), symmetric=False)
        if kind == "Int8WeightOnlyConfig":
            gran = data.get("granularity") or {"_type": "PerRow"}
            group = gran["_data"]["group_size"] if gran.get("_type") == "PerGroup" else None
            return Option(8, group_size=group)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{source}: cannot read the torchao config of {key!r}: {exc}") from None
    raise ExportError(
        f"{source}: {key!r} has a {kind or type(cfg).__name__} config; mpsearch reads weight-only "
        f"integer configs (IntxWeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig) or null"
    )


def to_torchao_config(plan: BitPlan):
    """The plan as a ``torchao.quantization.FqnToConfig`` object (needs torchao)."""
    preload_torchao()
    try:
        import torch
        from torchao.quantization import (FqnToConfig, IntxWeightOnlyConfig, MappingType, PerAxis,
                                          PerGroup)
    except ImportError as exc:
        raise ExportError(
            f"to_torchao_config needs torchao ({exc}); pip install torchao, or use the JSON form "
            f"(export_plan(plan, 'torchao'))"
        ) from None
    from collections import OrderedDict

    table = OrderedDict()
    for lay in plan.layers:
        opt = plan.option(lay)
        if opt.is_keep:
            table[lay] = None
            continue
        declared = consumer_config(opt, "torchao")
        if declared is not None:  # a format that declares its config (int8wo: Int8WeightOnlyConfig())
            from torchao.core.config import config_from_dict

            table[lay] = config_from_dict(declared)
            continue
        opt = int_settings(opt)
        table[lay] = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{opt.bits}"),
            granularity=PerAxis(0) if opt.group_size is None else PerGroup(opt.group_size),
            mapping_type=MappingType.SYMMETRIC if opt.symmetric else MappingType.ASYMMETRIC,
        )
    return FqnToConfig(table)
