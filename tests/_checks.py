"""Checks shared by the test modules."""

from __future__ import annotations

import numpy as np


def assert_bits_equal(actual, expected) -> None:
    """Same dtype, shape and bytes (so -0.0 and NaN payloads count)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if expected.dtype.itemsize:
        np.testing.assert_array_equal(actual.reshape(-1).view(np.uint8),
                                      expected.reshape(-1).view(np.uint8))
