"""Serve your own model locally: ``nitrovault local up --model PATH [--handler NAME]``.

:func:`model_from_path` turns what a Hugging Face user has on disk into a :class:`LocalModel`:

* a **sentence-transformers** folder (``modules.json`` or ``sentence_bert_config.json``; a BERT-family
  encoder with mean pooling, ``config.json``, ``tokenizer.json``, ``model.safetensors``) → the
  ``sentence-embedding`` handler, with the embedding demo's watermark (EmbMarker) under the owner's key;
* a **causal LM** folder (``config.json`` whose ``model_type`` is a registered ``causal-lm`` architecture:
  gpt2, llama; ``tokenizer.json``; ``model.safetensors``) → ``causal-lm:<model_type>``, with the text
  watermark (:mod:`nitrovault.local.lm_demo`);
* a **safetensors** file or a folder holding one, with ``--handler generic:<architecture>`` (or a file
  whose ``__metadata__`` already names its ``nitrovault.handler``) → that handler, no output protection;
  a folder's ``config.json`` becomes the sealed ``nitrovault.config``.

Before anything is sealed, the plain file is loaded with the enclave's own handler code
(:func:`enclave_app.models.load_handler`) so that a model the enclave could not serve fails here, with the
enclave's reason, rather than at boot behind attestation. What cannot be served is refused with why:
pickle checkpoints (``pytorch_model.bin`` can run code when loaded; convert to safetensors), sharded
checkpoints, a missing fast tokenizer, an architecture the image does not register, pooling other than
mean. The model id is the folder's (or file's) name, lower-cased, with anything outside ``[a-z0-9._-]``
turned into ``-``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch

from enclave_app.models import ARCHITECTURES, HANDLER_KEY, LM_ARCHITECTURES, ModelLoadError, load_handler
from enclave_app.models.generic import CONFIG_KEY
from enclave_app.outputs import SealedExtras
from nitrovault.envelope.extras import read_header
from nitrovault.errors import ConfigError
from nitrovault.local.homes import Paths, StackError
from nitrovault.local.lm_demo import lm_model
from nitrovault.local.models import (
    DEMO_HANDLER,
    DEMO_PROTECTION,
    GENERATING_HANDLER,
    LocalModel,
    owner_embedding_mark,
    owner_plain_file,
    sentence_embedding_metadata,
)

STEP = "model"
VERSION = "1"
GENERIC = "generic:"
#: the sentence-transformers modules the sentence-embedding handler runs (encoder, mean pool, normalize)
SERVED_MODULES = frozenset(f"sentence_transformers.models.{name}"
                           for name in ("Transformer", "Pooling", "Normalize"))


def model_from_path(paths: Paths, path: Path, handler: str | None = None) -> LocalModel:
    """The model at ``path`` as a :class:`LocalModel` the stack can seal and serve, or a
    :class:`~nitrovault.local.homes.StackError` (step ``model``) saying why it cannot be."""
    path = path.expanduser()
    if not path.exists():
        raise StackError(STEP, f"{path} does not exist (give a model folder or a .safetensors file)")
    model_id = _model_id(path)
    if path.is_file():
        model = _from_file(paths, path, model_id, handler)
    else:
        model = _from_folder(paths, path, model_id, handler)
    try:
        check_loads(model.weights, model.handler, model.model_id)
    except StackError:
        model.weights.unlink(missing_ok=True)  # no plain copy of a model that will not be served
        raise
    return model


def _model_id(path: Path) -> str:
    name = path.resolve().name.removesuffix(".safetensors").lower()
    model_id = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-._")[:128]
    if not model_id:
        raise StackError(STEP, f"cannot make a model id from the name {path.name!r}; rename it")
    return model_id


def _from_file(paths: Paths, path: Path, model_id: str, handler: str | None) -> LocalModel:
    if path.suffix != ".safetensors":
        raise StackError(STEP, f"{path.name} is not a .safetensors file; only safetensors weights are "
                               f"served (pickle checkpoints can run code when loaded)")
    header = _header(path)
    named = header.get(HANDLER_KEY)
    chosen = handler or named
    if not chosen:
        raise StackError(STEP, f"{path.name} does not name its handler: pass --handler "
                               f"generic:<architecture> (registered: {', '.join(_generic_names())})")
    _check_handler(chosen)
    if chosen.startswith(GENERIC) and CONFIG_KEY not in header:
        raise StackError(STEP, f"{path.name} has no {CONFIG_KEY} in its metadata; put the file in a folder "
                               f"with its config.json and pass the folder")
    plain = owner_plain_file(paths, model_id, path, {HANDLER_KEY: chosen})
    return LocalModel(model_id, VERSION, chosen, plain)


def _from_folder(paths: Paths, folder: Path, model_id: str, handler: str | None) -> LocalModel:
    weights = _weights(folder)
    config = _config(folder)
    chosen = handler or _detect(folder, config)
    _check_handler(chosen)
    if chosen == DEMO_HANDLER:
        return _sentence_embedding(paths, folder, weights, config, model_id)
    if chosen.startswith(GENERATING_HANDLER):
        _tokenizer(folder)
        return lm_model(paths, folder, model_id=model_id, handler=chosen)
    metadata = {HANDLER_KEY: chosen, CONFIG_KEY: (folder / "config.json").read_text(encoding="utf-8")}
    plain = owner_plain_file(paths, model_id, weights, metadata)
    return LocalModel(model_id, VERSION, chosen, plain)


def _weights(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    if weights.is_file():
        return weights
    if (folder / "model.safetensors.index.json").is_file():
        raise StackError(STEP, f"{folder} holds a sharded checkpoint; nitrovault seals one file: merge the "
                               f"shards into model.safetensors (save_pretrained(max_shard_size='100GB'))")
    if any((folder / name).is_file() for name in ("pytorch_model.bin", "model.pt", "model.pth")):
        raise StackError(STEP, f"{folder} holds a pickle checkpoint only; pickles can run code when loaded, "
                               f"so only safetensors weights are served: save it with "
                               f"save_pretrained(safe_serialization=True)")
    raise StackError(STEP, f"{folder} has no model.safetensors")


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackError(STEP, f"{folder} has no config.json (the architecture's settings)") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise StackError(STEP, f"{folder}/config.json is not JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise StackError(STEP, f"{folder}/config.json is not a JSON object")
    return config


def _detect(folder: Path, config: Mapping[str, Any]) -> str:
    """The handler a folder's files call for, or why none does."""
    if (folder / "modules.json").is_file() or (folder / "sentence_bert_config.json").is_file():
        return DEMO_HANDLER
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in LM_ARCHITECTURES:
        return f"{GENERATING_HANDLER}{model_type}"
    architectures = config.get("architectures") or []
    raise StackError(STEP, (
        f"{folder} is not a model nitrovault can serve as is: config.json says model_type {model_type!r}, "
        f"architectures {architectures}. Served: sentence-transformers BERT encoders (sentence-embedding), "
        f"causal LMs of type {', '.join(sorted(LM_ARCHITECTURES))} (causal-lm:<type>), or safetensors with "
        f"--handler generic:<architecture> (registered: {', '.join(_generic_names())})"))


def _generic_names() -> list[str]:
    return [f"{GENERIC}{name}" for name in sorted(ARCHITECTURES)]


def _check_handler(name: str) -> None:
    kind, _, architecture = name.partition(":")
    registered = ((name == DEMO_HANDLER) or (kind == "generic" and architecture in ARCHITECTURES)
                  or (kind == "causal-lm" and architecture in LM_ARCHITECTURES))
    if not registered:
        lms = [f"{GENERATING_HANDLER}{a}" for a in sorted(LM_ARCHITECTURES)]
        known = [DEMO_HANDLER, *_generic_names(), *lms]
        raise StackError(STEP, f"no handler {name!r} is registered in the enclave image; registered: "
                               f"{', '.join(known)}")


def _header(path: Path) -> dict[str, str]:
    try:
        header, _, _ = read_header(path)
    except ConfigError as err:
        raise StackError(STEP, f"{path.name} is not a safetensors file: {err}") from None
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def _sentence_embedding(paths: Paths, folder: Path, weights: Path, config: Mapping[str, Any],
                        model_id: str) -> LocalModel:
    if config.get("model_type") != "bert":
        raise StackError(STEP, f"the sentence-embedding handler serves BERT-family encoders; {folder} is "
                               f"model_type {config.get('model_type')!r}")
    _tokenizer(folder)
    modules = _json_or_empty(folder / "modules.json", default=[])
    extra = [m.get("type") for m in modules if isinstance(m, dict) and m.get("type") not in SERVED_MODULES]
    if extra:
        raise StackError(STEP, f"{folder}'s pipeline has modules the sentence-embedding handler does not "
                               f"run: {extra} (it runs the encoder, mean pooling and normalization)")
    pooling = _json_or_empty(folder / "1_Pooling" / "config.json")
    if pooling and not pooling.get("pooling_mode_mean_tokens", False):
        modes = sorted(k.removeprefix("pooling_mode_") for k, v in pooling.items()
                       if k.startswith("pooling_mode_") and v is True)
        raise StackError(STEP, f"{folder} pools with {modes}; the sentence-embedding handler mean-pools")
    metadata = {**sentence_embedding_metadata(folder), **owner_embedding_mark(paths)}
    plain = owner_plain_file(paths, model_id, weights, metadata)
    return LocalModel(model_id, VERSION, DEMO_HANDLER, plain, protection=DEMO_PROTECTION)


def _tokenizer(folder: Path) -> Path:
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        raise StackError(STEP, f"{folder} has no tokenizer.json: the enclave runs a fast tokenizer; write "
                               f"one with AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    return tokenizer


def _json_or_empty(path: Path, default: Any = None) -> Any:
    """``path``'s JSON when it is of ``default``'s type (a dict unless given), else ``default``."""
    default = {} if default is None else default
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise StackError(STEP, f"{path} is not JSON ({type(err).__name__})") from None
    return value if isinstance(value, type(default)) else default


def check_loads(plain: Path, handler: str, model_id: str) -> None:
    """Load ``plain`` with the enclave's own code, as the enclave's model-load step will after unsealing
    it: the sealed extras taken out and parsed, the handler loaded and warmed up."""

    try:
        tensors = safetensors.torch.load_file(str(plain))
    except (OSError, ValueError, RuntimeError) as err:  # safetensors' own errors
        raise StackError(STEP, f"cannot read {plain.name}: {type(err).__name__}") from None
    metadata = _header(plain)
    try:
        SealedExtras.take(tensors, metadata, model_id)
        load_handler(handler, tensors, metadata).warm_up()
    except ModelLoadError as err:
        raise StackError(STEP, f"the enclave could not load it as {handler}: {err}") from None
