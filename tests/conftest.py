"""Shared fixtures: one real SmolLM2 model per test session, built lazily."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32), downloaded once per machine and loaded once per session."""
    from shadowserve.model.loader import load_model

    return load_model("smollm2-135m", "float32", progress=False)


@pytest.fixture(scope="session")
def tiny():
    from shadowserve.model.loader import load_model

    return load_model("tiny-random", "float32", progress=False)
