import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# The CI machine has 2 cores shared with whatever else runs; torch's OpenMP threads stall badly
# when a core is busy, so tests run single-threaded (timings stable, results identical).
torch.set_num_threads(1)
