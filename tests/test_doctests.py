"""The examples in the pure modules' docstrings run as doctests, so the docs cannot drift from the code.

Modules whose examples start Ray, train or open a W&B run (driver, rounds, improve, train, tracking,
evaluate, report) are covered by their own tests instead.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

PURE = ["pipelines.stats", "pipelines.config", "pipelines.schemas", "pipelines.pools", "pipelines.store",
        "pipelines.prompts", "pipelines.http_judge", "pipelines.audit", "pipelines.review", "pipelines.shapes_checks",
        "pipelines.rounds", "pipelines.results", "models.seeds", "trainers.faults",
        "serve.validation", "serve.api_models", "serve.chat", "serve.settings"]


@pytest.mark.parametrize("name", PURE)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples left"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
