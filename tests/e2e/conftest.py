"""End-to-end fixtures."""

from __future__ import annotations

import pytest

from reference import greedy_reference


@pytest.fixture(scope="session")
def reference(demo_model_dir) -> dict[str, str]:
    """transformers greedy continuations of reference.PROMPTS, margins checked."""
    return greedy_reference(demo_model_dir)
