import os
from pathlib import Path
from typing import Any

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


@pytest.fixture
def gpt_oss_checkpoint(tmp_path: Path) -> tuple[Any, Path]:
    """A tiny GPT-OSS model (eval mode) and the folder transformers saved it to, whose experts
    are stored fused as GPT-OSS checkpoints hold them (``[E, in, out]``, with biases)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.integrations.moe")  # transformers 5: fused experts
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2)
    model = transformers.GptOssForCausalLM(config).eval()
    folder = tmp_path / "gpt_oss"
    model.save_pretrained(str(folder))
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        if "model.layers.0.mlp.experts.gate_up_proj" not in set(f.keys()):
            pytest.skip("this transformers stores GPT-OSS experts per expert")
    return model, folder
