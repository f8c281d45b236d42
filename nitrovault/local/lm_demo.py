"""The third local demo model: a small GPT-2 streaming watermarked text (``nitrovault local up --model lm``).

The model is :data:`nitrovault.local.tiny_lm.DEMO` (4 layers, 128 wide, ~1.1 M parameters) trained on the
project's own README and docs the first time it is asked for (~95 s on 2 cores), kept in
``HOME/owner/lm/<digest>/`` and reused until the docs or the settings change. Its plain file,
``HOME/owner/plain/tiny-gpt2.safetensors`` (0600), is the weights with the ``causal-lm:gpt2`` handler, the
config, the tokenizer and the owner's watermark secret (``HOME/owner/owner-watermark.key``, the embedding
demo's) in ``__metadata__``.

The measured protection (:data:`LM_PROTECTION`) is the green-list text watermark (Kirchenbauer et al.,
gamma 0.25, delta 2, :mod:`nitrovault.watermark.text`) applied in the enclave's generation loop. The demo step
streams a continuation through the relay, then plays the owner: re-tokenizes the text it was given and
runs the z-test with the owner's key (``nitrovault watermark detect-text --text`` does the same).

Example::

    model = lm_model(Paths(home), ensure_tiny_lm(Paths(home).lm_cache, project_corpus(repo_root()), DEMO))
    stack = LocalStack(home, model=model)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from nitrovault.envelope.extras import WATERMARK_SECRET_KEY
from nitrovault.local.homes import Paths
from nitrovault.local.models import LocalModel, ensure_owner_watermark_key, owner_plain_file
from nitrovault.local.tiny_lm import sealing_metadata

if TYPE_CHECKING:
    from nitrovault.client import NitrovaultClient
    from nitrovault.watermark.text import TextDetection

LM_ID = "tiny-gpt2"
LM_VERSION = "1"
#: the green-list watermark on every generated token (the paper's gamma and δ)
LM_PROTECTION: Mapping[str, Any] = MappingProxyType({"watermark": {"text": {"gamma": 0.25, "delta": 2.0}}})
DEMO_PROMPT = "The enclave"
#: tokens the demo asks for: enough for the owner's z-test to be decisive, few enough to read
DEMO_TOKENS = 48


def lm_model(paths: Paths, folder: Path, *, model_id: str = LM_ID, handler: str = "causal-lm:gpt2",
             protection: Mapping[str, Any] | None = LM_PROTECTION) -> LocalModel:
    """The causal LM in ``folder`` (a :mod:`~nitrovault.local.tiny_lm` build, or any Hugging Face folder
    with config.json, tokenizer.json and model.safetensors that ``handler`` serves) as a
    :class:`LocalModel` with the owner's watermark secret sealed in, and a demo call that streams and
    detects."""
    key = ensure_owner_watermark_key(paths.owner_watermark_key)
    metadata = {**sealing_metadata(folder), "nitrovault.handler": handler, WATERMARK_SECRET_KEY: key}
    plain = owner_plain_file(paths, model_id, folder / "model.safetensors", metadata)
    model = LocalModel(model_id, LM_VERSION, handler, plain, protection=protection)
    secret = bytes.fromhex(key) if model.text_watermark else None
    return replace(model, demo_call=lm_demo_call(folder, secret, model_id))


def lm_demo_call(folder: Path, owner_secret: bytes | None, model_id: str,
                 prompt: str = DEMO_PROMPT) -> Callable[[NitrovaultClient], str]:
    """The demo step's call: stream a sampled continuation, time it, and (with the owner's secret) test the
    text for the owner's mark the way the owner would, from the text alone."""

    def call(client: NitrovaultClient) -> str:
        started = time.perf_counter()
        first: float | None = None
        with client.generate_stream(prompt, max_new_tokens=DEMO_TOKENS, temperature=0.8, top_p=0.95,
                                    seed=7) as stream:
            for _ in stream:
                first = first if first is not None else time.perf_counter() - started
        seconds = time.perf_counter() - started
        result = stream.result
        assert result is not None  # the stream raises unless its last message arrived
        shown = " ".join((prompt + result.text).split())
        line = (f"“{shown[:160]}{'…' if len(shown) > 160 else ''}” — {result.completion_tokens} tokens "
                f"streamed in {seconds * 1000:.0f} ms (first after {(first or seconds) * 1000:.0f} ms, "
                f"{result.completion_tokens / seconds:.0f} tokens/s), receipt over the stream verified")
        if owner_secret is not None:
            found = detect_in_text(result.text, folder, owner_secret, model_id)
            line += (f"; owner's detector on the text: z = {found.z:.1f} over {found.scored} tokens "
                     f"({'marked' if found.detected else 'not marked'})")
        return line

    return call


def detect_in_text(text: str, folder: Path, owner_secret: bytes, model_id: str) -> TextDetection:
    """The green-list z-test of ``text`` re-tokenized with the model's own tokenizer (``folder``'s
    tokenizer.json; the green lists span config.json's ``vocab_size``, as in the enclave; gamma of
    :data:`LM_PROTECTION`). Re-tokenizing may split a few tokens differently from how they were
    generated; those pairs score like unmarked text (green with probability gamma), diluting z a little."""
    from tokenizers import Tokenizer

    from nitrovault.watermark import derive_watermark_keys
    from nitrovault.watermark.text import GreenList, detect_text_mark

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    vocab_size = int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    gamma = float(LM_PROTECTION["watermark"]["text"]["gamma"])
    green = GreenList(derive_watermark_keys(owner_secret, model_id), vocab_size=vocab_size, gamma=gamma)
    return detect_text_mark(ids, green)
