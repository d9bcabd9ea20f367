"""Path helpers: local vs remote, and names that are safe as one directory."""

from __future__ import annotations

import re

import pytest

from stars.spec import is_local_path, safe_path_component
from stars.spec.paths import MAX_COMPONENT

SAFE = re.compile(r"^[A-Za-z0-9._=,+-]+$")

NASTY = [
    "../../x", "..", ".", "", "/etc/passwd", "a/b", "a\\b", "C:\\x", ".hidden", "~root", "x" * 500,
    "a b", "é", "\x00", "a\nb", "$(rm -rf)", "..\\..\\x", "a/../../b", "-", "=,+", "%2e%2e",
]


@pytest.mark.parametrize("text", NASTY)
def test_safe_path_component_is_one_harmless_name(text):
    name = safe_path_component(text)
    assert SAFE.match(name), name
    assert not name.startswith(".") and name not in (".", "..")
    assert "/" not in name and "\\" not in name
    assert 0 < len(name) <= MAX_COMPONENT


def test_safe_names_stay_readable_and_distinct_names_stay_distinct():
    assert safe_path_component("t003-type=rmsnorm,position=pre") == "t003-type=rmsnorm,position=pre"
    outputs = [safe_path_component(t) for t in ["a/b", "a_b", "a\\b", "a b", "x" * 300, "x" * 301]]
    assert len(set(outputs)) == len(outputs)
    assert safe_path_component("a_b") == "a_b"  # nothing replaced: no hash


def test_local_and_remote_paths():
    assert is_local_path("./runs") and is_local_path("/abs") and is_local_path("file:///x")
    assert not is_local_path("s3://bucket/x") and not is_local_path("gs://b")
