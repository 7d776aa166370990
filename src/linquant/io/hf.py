"""transformers' own ``save_pretrained`` and ``from_pretrained`` on linquant models and folders.

Neither can handle linquant's quantized layers, and neither fails by itself: ``save_pretrained``
of a quantized model writes the layers' buffers (``weight_qdata``, ...) under names that
``from_pretrained`` does not know, and ``from_pretrained`` of such a folder, or of one that
:func:`linquant.save` wrote, builds the model, warns about missing and unexpected weights and
returns the quantized layers freshly initialised. Here both raise instead:

* :func:`mark_model` (called by ``quantize_model``, ``load`` and ``load_into``) gives every
  transformers model (``PreTrainedModel``) holding quantized layers an ``hf_quantizer``, the
  attribute transformers gives the models its own quantizers load. ``save_pretrained`` asks it
  whether the model can be serialized; :class:`LinquantHfQuantizer` answers with a
  :class:`LinquantError` naming :func:`linquant.save`. (A ``SentenceTransformer``'s ``save``
  calls its transformers model's ``save_pretrained``, so it would raise too, but only after
  writing its own config; :class:`RefusedSave` refuses it first.)
* :func:`mark_config_file` (``save`` and ``linquant quantize``) writes
  ``"quantization_config": {"quant_method": "linquant", ...}`` into the folder's
  ``config.json`` when the folder holds quantized tensors. With linquant's quantizer registered
  (:func:`register`: done by the calls above, and by ``import linquant``, at once when
  transformers' quantizers are loaded, else by an import hook when they are),
  ``from_pretrained`` of such a folder raises a :class:`LinquantError` naming
  :func:`linquant.load`. Where linquant was never imported, transformers warns ``Unknown
  quantization type, got linquant`` and loads freshly initialised layers.

Everything here is a no-op where transformers is not installed or lacks the quantizer API
(``transformers.quantizers``, 4.36 and later).

:func:`loaded_buffer_dtypes` says which dtype transformers gives a model's non-persistent float
buffers when it loads the model in a given dtype, for ``quantize_model``'s cast to the compute
dtype and for ``load`` / ``load_into``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.abc
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linquant.errors import LinquantError
from linquant.io.format import FORMAT_VERSION

__all__ = [
    "QUANT_METHOD",
    "follow_loaded_dtypes",
    "is_linquant_config",
    "loaded_buffer_dtypes",
    "loaded_dtypes",
    "mark_config_file",
    "mark_model",
    "no_progress_bars",
    "quantization_config",
    "register",
    "unmark_model",
    "unpersisted_float_buffers",
]

QUANT_METHOD = "linquant"
_registered: list[Any] = []  # [LinquantHfQuantizer class] once registered


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off while a command loads a float model ("Loading
    weights: 100%|...", transformers 5), so they do not cut into linquant's output; restored
    after. Nothing happens without transformers."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` entry of a linquant folder's ``config.json``."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "load_with": "linquant.load(folder)"}


def is_linquant_config(entry: object) -> bool:
    """True for a ``quantization_config`` (dict or object) that linquant wrote."""
    method = entry.get("quant_method") if isinstance(entry, dict) else \
        getattr(entry, "quant_method", None)
    return str(getattr(method, "value", method)) == QUANT_METHOD


def mark_config_file(folder: str | os.PathLike[str]) -> bool:
    """Add :func:`quantization_config` to ``folder/config.json`` (a JSON object); returns
    whether it did. Meant for a folder being staged: the file is rewritten in place."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LinquantError(f"{path}: cannot read the model config to mark it as linquant's: "
                            f"{e}") from e
    if not isinstance(data, dict):
        return False
    data["quantization_config"] = quantization_config()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def _quantizer_class(hf_auto: Any = None) -> Any:
    """linquant's ``HfQuantizer`` (registered with transformers), or None without the API.
    ``hf_auto``: ``transformers.quantizers.auto`` when the caller has it (the import hook)."""
    if _registered:
        return _registered[0]
    try:
        if hf_auto is None:
            from transformers.quantizers import auto as hf_auto

        from linquant.io._hf_quantizer import LinquantHfConfig, LinquantHfQuantizer
    except ImportError:
        return None
    mapping = getattr(hf_auto, "AUTO_QUANTIZER_MAPPING", None)
    configs = getattr(hf_auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    if not isinstance(mapping, dict) or not isinstance(configs, dict):
        return None
    # Set directly rather than through register_quantizer(): that raises for a name already
    # taken, which a reloaded linquant (or a second copy) would hit.
    mapping[QUANT_METHOD] = LinquantHfQuantizer
    configs[QUANT_METHOD] = LinquantHfConfig
    _registered.append(LinquantHfQuantizer)
    return LinquantHfQuantizer


def register() -> bool:
    """Register linquant's quantizer with transformers (imports ``transformers.quantizers``);
    returns whether transformers has the API. Idempotent."""
    return _quantizer_class() is not None


_HOOKED = "transformers.quantizers.auto"  # the module holding transformers' quantizer tables


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers linquant's quantizer right after ``transformers.quantizers.auto`` (which
    ``transformers.modeling_utils`` imports) has run, so that ``from_pretrained`` of a linquant
    folder raises naming :func:`linquant.load` however the imports were ordered (``import
    linquant`` first, then transformers, is the usual order). Finds nothing itself: it wraps
    the module's loader as another finder made it. Removes itself once it fired."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _HOOKED:
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        run = getattr(loader, "exec_module", None)
        if spec is None or run is None:
            return spec

        def exec_module(module: Any) -> None:
            run(module)
            _unhook()
            with contextlib.suppress(Exception):  # never break transformers' own import
                _quantizer_class(module)

        loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec


def _unhook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def register_if_loaded() -> None:
    """What ``import linquant`` does: :func:`register` when transformers' quantizer tables are
    already imported (costs nothing then), else a hook that registers when they are
    (:class:`_RegisterOnImport`; transformers is not imported for it)."""
    if _HOOKED in sys.modules or "transformers.modeling_utils" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _is_pretrained_model(module: nn.Module) -> bool:
    return any(c.__module__ == "transformers.modeling_utils" and c.__name__ == "PreTrainedModel"
               for c in type(module).__mro__)


class RefusedSave:
    """Stands in, on a quantized ``SentenceTransformer`` instance, for its ``save`` (and
    ``save_pretrained``, ``push_to_hub``, ``save_to_hub``): raises before sentence-transformers
    writes anything. Its transformers model refuses too, but only after sentence-transformers
    has made the folder and written ``config_sentence_transformers.json``, where
    ``linquant.save`` then refused to write ("already exists")."""

    def __init__(self, method: str) -> None:
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise LinquantError(
            f"SentenceTransformer.{self.method} cannot write linquant's quantized layers "
            "(sentence-transformers would save buffers that it cannot load); nothing was "
            "written. Save the model with linquant.save(model, folder): the modules, their "
            "configs, tokenizer files and the quantized weights, which linquant.load(folder) "
            "reads back")


_REFUSED_SAVES = ("save", "save_pretrained", "push_to_hub", "save_to_hub")


def _is_sentence_transformer(module: nn.Module) -> bool:
    return any(c.__module__.startswith("sentence_transformers") and
               c.__name__ == "SentenceTransformer" for c in type(module).__mro__)


def mark_model(model: nn.Module) -> int:
    """Give each transformers model in ``model`` (itself included) that holds quantized layers
    linquant's ``hf_quantizer``; returns how many were marked. A model that already has an
    ``hf_quantizer`` of another library keeps it. A ``SentenceTransformer`` holding quantized
    layers gets :class:`RefusedSave` for its save methods."""
    from linquant.nn.base import QuantModule

    for m in model.modules():
        if _is_sentence_transformer(m) and any(isinstance(q, QuantModule) for q in m.modules()):
            for method in _REFUSED_SAVES:
                if hasattr(type(m), method):
                    m.__dict__[method] = RefusedSave(method)
    candidates = [m for m in model.modules() if _is_pretrained_model(m)]
    if not candidates:
        return 0
    cls = _quantizer_class()
    if cls is None:
        return 0
    marked = 0
    for m in candidates:
        if not any(isinstance(q, QuantModule) for q in m.modules()):
            continue
        current = getattr(m, "hf_quantizer", None)
        if current is not None and not isinstance(current, cls):
            continue
        if current is None:
            m.hf_quantizer = cls(cls.config_class(), pre_quantized=True)
        marked += 1
    return marked


def unmark_model(model: nn.Module) -> None:
    """Drop linquant's ``hf_quantizer`` and ``quantization_config`` from each transformers
    model in ``model`` (after :func:`linquant.dequantize_model`); another library's are kept."""
    for m in model.modules():
        for method in _REFUSED_SAVES:
            if isinstance(m.__dict__.get(method), RefusedSave):
                del m.__dict__[method]
        if not _is_pretrained_model(m):
            continue
        if _registered and isinstance(m.__dict__.get("hf_quantizer"), _registered[0]):
            del m.__dict__["hf_quantizer"]
        config = getattr(m, "config", None)
        if config is not None and is_linquant_config(getattr(config, "quantization_config",
                                                             None)):
            with contextlib.suppress(AttributeError):
                delattr(config, "quantization_config")


def _built_on_meta(model: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """``model``'s class built again from its config on the meta device, with ``dtype`` as the
    default dtype (as transformers builds a model it loads in ``dtype``); None where the class
    cannot be built that way."""
    old = torch.get_default_dtype()
    config = copy.deepcopy(model.config)
    for c in [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))]:
        for key in ("dtype", "torch_dtype"):  # as from_pretrained(dtype=...) sets them: a
            # composite model builds its parts in its sub-configs' dtype. Read from the
            # instance's own fields: transformers 5's `torch_dtype` is a property that warns
            if c is not None and vars(c).get(key) is not None:
                setattr(c, key, dtype)
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            return type(model)(config)  # type: ignore[no-any-return]
    except Exception:  # any failure of a model's own __init__: keep the buffers' dtypes
        return None
    finally:
        torch.set_default_dtype(old)


def _fp32_plan(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """What ``from_pretrained(..., dtype=dtype)`` loads in fp32 whatever ``dtype`` says: the
    names listed in ``_keep_in_fp32_modules_strict`` (for fp16 and bf16) and
    ``_keep_in_fp32_modules`` (for fp16 only) by any module of ``model``, as one pattern that a
    stored tensor's name is searched with, as transformers matches them: anywhere in the name
    (``*`` for any text) in transformers 5, as whole dotted parts in transformers 4."""
    attrs = ["_keep_in_fp32_modules_strict"] if dtype in (torch.float16, torch.bfloat16) else []
    if dtype == torch.float16:
        attrs.append("_keep_in_fp32_modules")
    names: set[str] = set()
    for m in model.modules():
        for attr in attrs:
            entries = getattr(m, attr, None)
            if isinstance(entries, (list, tuple, set, frozenset)):
                names.update(e for e in entries if isinstance(e, str) and e)
    if not names:
        return None
    major = int(str(getattr(sys.modules.get("transformers"), "__version__", "5")).split(".")[0])
    patterns = (n.replace("*", ".*") if major >= 5 else rf"(?:^|\.){n}(?:$|\.)"
                for n in sorted(names))
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def loaded_dtypes(model: nn.Module, dtype: torch.dtype, *, unpersisted_only: bool = False
                  ) -> dict[str, torch.dtype]:
    """``{qualified name: dtype}`` of the float parameters and buffers of the transformers
    models in ``model`` (``PreTrainedModel`` submodules, itself included), as
    ``from_pretrained(..., dtype=dtype)`` makes them:

    * the buffers a model computes at construction and does not store: transformers builds a
      model under ``dtype`` as the default dtype, so a table made in the default dtype
      (M2M100's and XGLM's sinusoidal positions, Gemma's embedding scale) comes out in
      ``dtype``, one made in fp32 on purpose (a rotary embedding's ``inv_freq``) in fp32;
    * the stored tensors: fp32 for those its ``_keep_in_fp32_modules(_strict)`` names (a MoE
      router's weight, T5's ``wo`` under fp16), ``dtype`` for the others. (from_pretrained
      also keeps a stored tensor that the class makes in fp32 regardless, DeBERTa's
      ``q_bias``, XLNet's attention weights, and then their own forward fails in bf16;
      ``model.to(dtype)`` casts those, and so does linquant.)

    Found by building each model's class again from its config on the meta device (nothing is
    allocated); tensors outside transformers models, or of a class that cannot be built so,
    are not in the result. ``unpersisted_only``: only the buffers the ``state_dict`` leaves
    out. Empty where transformers is not imported."""
    if "transformers" not in sys.modules or not dtype.is_floating_point:
        return {}
    wanted: dict[str, torch.dtype] = {}
    done: list[str] = []
    for name, sub in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in done) or \
                not _is_pretrained_model(sub) or getattr(sub, "config", None) is None:
            continue
        done.append(name)
        built = _built_on_meta(sub, dtype)
        if built is None:
            continue
        plan = None if unpersisted_only else _fp32_plan(built, dtype)
        for mod_name, mod in built.named_modules():
            tensors = [(n, t, n in mod._non_persistent_buffers_set)
                       for n, t in mod._buffers.items()]
            if not unpersisted_only:
                tensors += [(n, t, False) for n, t in mod._parameters.items()]
            for t_name, t, unpersisted in tensors:
                if t is None or not t.is_floating_point() or (unpersisted_only and
                                                              not unpersisted):
                    continue
                local = f"{mod_name}.{t_name}" if mod_name else t_name
                if not unpersisted:  # stored: the keep lists decide, not the class
                    t_dtype = torch.float32 if plan is not None and plan.search(local) else dtype
                else:
                    t_dtype = t.dtype
                wanted[f"{name}.{local}" if name else local] = t_dtype
    return wanted


def loaded_buffer_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """:func:`loaded_dtypes` of the float buffers that the transformers models in ``model`` do
    not persist (computed at construction, never loaded)."""
    return loaded_dtypes(model, dtype, unpersisted_only=True)


def unpersisted_float_buffers(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """``{qualified name: (module, name, tensor)}`` of ``model``'s float buffers that its
    ``state_dict`` leaves out (non-persistent: computed at construction)."""
    return {f"{prefix}{'.' if prefix else ''}{n}": (m, n, b)
            for prefix, m in model.named_modules() for n, b in m._buffers.items()
            if n in m._non_persistent_buffers_set and b is not None and b.is_floating_point()}


def follow_loaded_dtypes(model: nn.Module, dtype: torch.dtype,
                         buffers: dict[str, tuple[nn.Module, str, torch.Tensor]],
                         wanted: dict[str, torch.dtype] | None = None) -> None:
    """Put each of ``buffers`` (:func:`unpersisted_float_buffers`, possibly taken before a
    cast) back into its module in the dtype :func:`loaded_buffer_dtypes` gives it for
    ``dtype``, or as it is where that gives none or a wider one: a buffer already rounded to
    16 bits (a model cast with ``.to(torch.bfloat16)`` before quantizing) gains nothing from
    fp32, and kept as it is, it is what ``linquant.load`` builds again from its saved dtype.
    ``wanted``: :func:`loaded_dtypes` where the caller has it already."""
    if wanted is None:
        wanted = loaded_buffer_dtypes(model, dtype) if buffers else {}
    for name, (mod, attr, buf) in buffers.items():
        keep = name not in wanted or wanted[name].itemsize > buf.dtype.itemsize
        mod._buffers[attr] = buf if keep else buf.to(wanted[name])
