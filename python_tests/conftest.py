"""Shared pytest configuration: hypothesis profiles.

"ci" (the default): no deadline (the machine is shared and timings vary), a modest number of
examples and derandomized generation, so every run exercises the same examples and a failure
reproduces exactly. "dev": more, random examples for local bug hunting. Select with the
environment variable HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
