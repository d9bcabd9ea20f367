"""The resources section's rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError


def test_resources_rules(spec_of):
    spec = spec_of(resources={"use_gpu": True, "accelerator_type": "A800"})
    assert spec.resources.gpus_per_worker == 1
    with pytest.raises(ValidationError, match="needs resources.use_gpu"):
        spec_of(resources={"accelerator_type": "A800"})
    with pytest.raises(ValidationError, match="cpus_per_worker"):
        spec_of(resources={"resources_per_worker": {"CPU": 2}})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        spec_of(resources={"resources_per_worker": {"label": -1}})
