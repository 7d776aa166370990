"""quantize_model on tiny random models of many transformers architectures: each one runs,
generates, and stays close to the float model (a regression net for the layer types, ties,
fp32-kept modules and weight reads that real models bring)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from linquant.convert import quantize_model
from linquant.ops.metrics import sqnr

transformers = pytest.importorskip("transformers")

SMALL: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
    vocab_size=128, n_embd=64, n_layer=1, n_head=4, d_model=64, encoder_layers=1,
    decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
    decoder_ffn_dim=128, num_key_value_heads=2, max_position_embeddings=64, ffn_dim=128,
    num_layers=1, num_decoder_layers=1, num_heads=4, d_ff=128, d_kv=16, pad_token_id=0,
    rotary_dim=8, n_positions=64, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=64)
# model type -> the weakest output SQNR (dB) seen under w4a16-g32 (w8a8 gets 15 dB more)
ARCHITECTURES = {
    "llama": 14, "mistral": 14, "qwen2": 14, "qwen3": 12, "phi3": 12, "gemma2": 11,
    "falcon": 14, "gpt2": 14, "gptj": 12, "gpt_neox": 12, "bloom": 16, "opt": 12, "bart": 30,
    "t5": 14, "roberta": 16, "deberta-v2": 17, "gpt_bigcode": 14, "mpt": 12,
    "phi": 14, "olmo2": 13, "glm4": 11, "mamba": 15,
    # SMALL leaves Marian's decoder_vocab_size at 58101: its head is built for 128 outputs,
    # then tied to the 58101-row embedding, and computes with that weight (so must linquant)
    "marian": 18,
    # mixture of experts (transformers 5: fused experts, linquant.nn.experts)
    "mixtral": 16, "qwen3_moe": 14, "gpt_oss": 12, "olmoe": 15, "phimoe": 14, "llama4_text": 12,
    "qwen2_moe": 15, "granitemoe": 16, "aria_text": 14, "nemotron_h": 10,
}
# with fused experts in transformers 5: gated, transposed (gpt_oss, aria_text), with biases
# (gpt_oss), without a gate (nemotron_h), Llama 4's dense dispatch
MOE = ("mixtral", "qwen3_moe", "gpt_oss", "olmoe", "phimoe", "llama4_text", "qwen2_moe",
       "granitemoe", "aria_text", "nemotron_h")


def _build(model_type: str) -> tuple[Any, Any, dict[str, torch.Tensor], bool]:
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:  # an architecture newer than this transformers
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    for key, value in SMALL.items():
        if hasattr(config, key) and not isinstance(getattr(type(config), key, None), property):
            setattr(config, key, value)
    if model_type == "t5":
        config.decoder_start_token_id = 0
    torch.manual_seed(0)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM,
                 transformers.AutoModel):
        try:
            model = auto.from_config(config).eval()
            break
        except ValueError:  # no such head for this architecture
            continue
    reference = type(model)(config).eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(1, 100, (1, 9))
    inputs = {"input_ids": ids}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    generates = auto is not transformers.AutoModel
    return model, reference, inputs, generates


def _output(out: Any) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@pytest.mark.parametrize("preset", ["w8a8", "w4a16-g32"])
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_quantized_architecture_runs_close_to_float(model_type: str, preset: str) -> None:
    model, reference, inputs, generates = _build(model_type)
    report = quantize_model(model, preset)
    assert len(report.quantized) >= 4, [(r.name, r.reason) for r in report.skipped]
    with torch.inference_mode():
        got, want = _output(model(**inputs)), _output(reference(**inputs))
        assert sqnr(want, got) > ARCHITECTURES[model_type] + (15 if preset == "w8a8" else 0)
        if generates:
            prompt = inputs["input_ids"][:, :4]
            out = model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert out.shape[-1] >= 2


@pytest.mark.parametrize("model_type", MOE)
def test_fused_experts_are_quantized(model_type: str) -> None:
    pytest.importorskip("transformers.integrations.moe")  # transformers 5: fused experts
    from linquant.nn.experts import QuantExperts, QuantExpertsProj

    model = _build(model_type)[0]
    report = quantize_model(model, "w4a16-g32")
    wrapped = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert len(wrapped) == 1 and wrapped[0].num_quantized == 2
    assert isinstance(wrapped[0].down_proj, QuantExpertsProj)
    experts = [r for r in report.layers if r.type == wrapped[0].float_class.__name__]
    assert [r.name.rsplit(".", 1)[1] for r in experts] == [
        "gate_up_proj" if wrapped[0].has_gate else "up_proj", "down_proj"]
    assert all(r.quantized for r in experts)
    assert all(r.shape[0] == wrapped[0].num_experts and r.bits_per_weight == 4.625
               for r in experts)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16-g32"])
def test_whisper_convolutional_front_end_is_quantized(preset: str) -> None:
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    reference = transformers.WhisperForConditionalGeneration(config).eval()
    reference.load_state_dict(model.state_dict())
    report = quantize_model(model, preset)
    convs = [r for r in report.layers if r.type == "Conv1d"]
    assert len(convs) == 2 and all(r.quantized for r in convs)
    features, prompt = torch.randn(1, 16, 64), torch.tensor([[1, 5, 7]])
    dtype = torch.bfloat16 if preset == "w4a16-g32" else torch.float32  # the model's, now
    with torch.inference_mode():
        got = model(input_features=features.to(dtype), decoder_input_ids=prompt).logits.float()
        want = reference(input_features=features, decoder_input_ids=prompt).logits
    assert sqnr(want, got) > (15 if preset == "w4a16-g32" else 30)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_dequantize_gives_back_the_float_architecture(model_type: str, tmp_path: Any) -> None:
    """transformers' ``model.dequantize()`` (linquant.dequantize_model): the float model's
    module types and state-dict keys again, outputs as the quantized model's, and
    save_pretrained / from_pretrained work on it."""
    pytest.importorskip("transformers.quantizers")
    from linquant.nn import QuantModule
    from linquant.nn.experts import QuantExperts

    model, reference, inputs, _ = _build(model_type)
    quantize_model(model, "w4a16-g32")
    with torch.inference_mode():
        quantized = _output(model(**inputs))
    model.dequantize()
    assert not [n for n, m in model.named_modules() if isinstance(m, (QuantModule, QuantExperts))]
    assert {n: type(m) for n, m in model.named_modules()} == \
        {n: type(m) for n, m in reference.named_modules()}
    assert list(model.state_dict()) == list(reference.state_dict())  # keys and their order
    with torch.inference_mode():
        got = _output(model(**inputs))
    assert sqnr(quantized, got) > 25
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and not isinstance(  # (Mamba's is a read-only property)
            getattr(type(model.config), "layer_types", None), property):
        # _build shrank num_hidden_layers behind the config's back
        model.config.layer_types = layer_types[:model.config.num_hidden_layers]
    model.save_pretrained(str(tmp_path / "float"))
    again = type(model).from_pretrained(str(tmp_path / "float"), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert torch.equal(_output(again(**inputs)), got)
