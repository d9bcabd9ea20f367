"""Depth lists: parsing, printing, and how the eval section uses them."""

from __future__ import annotations

import pytest

from stars.spec import MAX_DEPTH, compact_depths, parse_depths


def test_depth_lists_parse_and_print_compactly(spec_of):
    assert parse_depths("1-16") == list(range(1, 17))
    assert parse_depths("1-4, 8,16") == [1, 2, 3, 4, 8, 16]
    assert parse_depths([8, 1, 8]) == [1, 8]
    assert compact_depths([1, 2, 3, 4, 8, 16, 15]) == "1-4,8,15-16"
    for bad in ("1-x", "4-1", "0-3", "", True, [1.5], f"1-{MAX_DEPTH + 1}"):
        with pytest.raises(ValueError):
            parse_depths(bad)
    spec = spec_of(eval={"depths": "1-8,12", "rho_depths": "4,16", "limit": 50})
    assert spec.eval.depths == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    assert spec.model_dump(mode="json")["eval"]["depths"] == "1-8,12"
    assert spec.eval.rho_depths == [4, 16] and spec.eval.limit == 50
