"""Fixtures for the model-layer tests: one tiny random Janus per module (built offline, < 1 s)."""

import pytest
import torch

from models.tiny import build_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


@pytest.fixture(scope="module")
def prompts():
    # different lengths, so the batch is left-padded
    return ["a red circle", "two blue squares left of a green triangle", "yellow"]
