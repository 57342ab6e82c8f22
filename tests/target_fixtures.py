"""A test-only consumer format and target (imported by several test modules; registered once)."""

import torch

from mpsearch import formats
from mpsearch.targets import Target


class Block8(formats.Format):
    """A test format: int4 symmetric in blocks of 8 columns, one fp16 scale per block."""

    name = "test_blk8"
    bits = 4
    consumer = "tests"
    level_group = 8

    def size_bits(self, out_channels, in_features):
        return out_channels * in_features * 4 + out_channels * (in_features // 8) * 16

    def check_shape(self, out_channels, in_features):
        return None if in_features % 8 == 0 else f"{in_features} columns are not a multiple of 8"

    def quantize(self, m):
        g = m.reshape(m.shape[0], -1, 8)
        s = g.abs().amax(-1, keepdim=True) / 7
        s = torch.where(s > 0, s, torch.ones_like(s))
        return (torch.clamp(torch.round(g / s), -7, 7) * s).reshape(m.shape)


formats.register(Block8())


class TestTarget(Target):
    name = "test-target"
    options = ("test_blk8", "int8", "keep")
    default_options = ("test_blk8", "int8")


TEST_TARGET = TestTarget()
