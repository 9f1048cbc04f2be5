"""Shared test fixtures. Tests run on a busy 2-core CPU: one torch thread, one encoder."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def raw_encoder():
    """The raw EfficientNet-Lite0 backbone (no checkpoint), loaded once per session."""
    from sbir_core.encoders import create_encoder

    return create_encoder(checkpoint="none")
