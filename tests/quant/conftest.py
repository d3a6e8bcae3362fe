"""Fixtures of the quantizer tests."""

import zlib

import numpy as np
import pytest
from quant_cases import FAMILIES, SHAPE


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    """(name, float32 weights of SHAPE) for each family, seeded by the family name."""
    rng = np.random.default_rng(zlib.crc32(request.param.encode()))
    return request.param, FAMILIES[request.param](rng, SHAPE).astype(np.float32)
