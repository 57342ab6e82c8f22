"""``mpsearch``: the library's own integer options (round to nearest), the default target.

Any ``intB[-gG][-asym]`` option is executable (the applier's fake quantization is the consumer);
group sizes must divide nothing (a shorter last group is allowed). The default search set is the
default pipeline's: asymmetric per-channel int2..int8.
"""

from __future__ import annotations

from . import Target
from ..errors import MpsearchError
from ..options import DEFAULT_SEARCH_OPTIONS, parse_option, parse_options


class MpsearchTarget(Target):
    name = "mpsearch"
    consumer = "mpsearch apply (fake quantization, round to nearest)"
    description = "mpsearch's own integer options: int1-8, symmetric or asymmetric, per channel or in groups"
    exporter = None
    default_options = tuple(DEFAULT_SEARCH_OPTIONS.split(","))
    options = default_options + ("keep",)
    per_expert = True  # the applier quantizes any slice of a stacked expert tensor

    def parsed_options(self, names=None, imatrix: bool = False):
        opts = parse_options(names if names is not None else ",".join(self.default_options))
        bad = [o.name for o in opts if o.fmt is not None]
        if bad:
            raise MpsearchError(
                f"target 'mpsearch' takes mpsearch's integer options (intB[-gG][-asym], keep), not "
                f"{', '.join(bad)}; pick the consumer's target with --target (see 'mpsearch targets')"
            )
        return opts


MPSEARCH = MpsearchTarget()

__all__ = ["MPSEARCH", "parse_option"]
