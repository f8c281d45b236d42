"""What streaming generation costs through nitrovault, and what the text watermark costs and buys
(``python -m bench.run generate``).

Two models: the demo LM of ``nitrovault local up --model lm`` (:data:`nitrovault.local.tiny_lm.DEMO`, a
4-layer GPT-2 trained on the project's docs; built once into ``.nitrovault/owner/lm``, ~95 s, then reused)
and a GPT-2 small shaped model (12 x 768, 124 M parameters, random weights and the demo's tokenizer:
decoding speed does not depend on the weights' values, and nothing is downloaded).

* ``generate_tokens_per_s`` (one row per model): tokens per second of one ``Generate`` stream at a time
  through the whole local stack (relay, TLS into the enclave, token, per-message charging, the
  green-list mark, receipt over the transcript, audit) vs the same handler over the same weights called
  in process with the same settings and one enclave worker's torch threads, without the mark. The calls
  alternate, served then plain, so that both see the same machine. Target >= 0.8.
* ``time_to_first_token_ms`` (one row per model): median time from sending the request to the first
  text piece, same two sides; ``ratio`` = plain / served (higher is better), target >= 0.8.
* ``text_watermark_lm``: in process, :data:`SAMPLES` continuations of distinct prompts from the docs with
  the mark (gamma 0.25, delta 2) and as many without; each text re-tokenized as the owner would from the
  text alone and z-tested. ``value`` = the true-positive rate at a false-positive rate of 1e-5
  (z >= 4.265); the measured false positives of the unmarked texts beside it; the perplexity cost is the
  unmarked model's perplexity of marked texts over that of unmarked ones; tokens/s of both arms.
* ``generate_tokens_per_s_by_size``: what one CPU enclave worker decodes per second for GPT-2 small,
  medium and large shapes (random weights, in process): the model size vs tokens/s table of
  docs/serving.md.

Every call samples with the same settings and seed (temperature 0.8, top-p 0.95); the mark changes which
tokens are drawn, so counts may differ by an early end-of-text, and rates are tokens over seconds.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from scipy.stats import norm
from transformers import GPT2Config, GPT2LMHeadModel

from enclave_app.config import Batching
from enclave_app.models import load_handler
from enclave_app.models.causal_lm import CausalLMHandler, TextRequest
from enclave_app.models.generation import Sampling
from enclave_app.models.green_list import GreenListProcessor
from nitrovault.local.homes import Paths, free_port
from nitrovault.local.lm_demo import LM_ID, LM_PROTECTION, detect_in_text, lm_model
from nitrovault.local.provision import LOCAL_TIERS
from nitrovault.local.stack import REPO_ROOT, LocalStack, TextProgress
from nitrovault.local.tiny_lm import DEMO, ensure_tiny_lm, perplexity, project_corpus, sealing_metadata
from nitrovault.watermark import derive_watermark_keys

PROMPT = "The enclave attests to KMS"
NEW_TOKENS = 128
CALLS = 12
#: the GPT-2 small shaped comparison: fewer, shorter calls (it decodes ~20 tokens/s on one thread)
SMALL_TOKENS = 24
SMALL_CALLS = 4
SAMPLES = 40
SAMPLE_TOKENS = 160
FPR = 1e-5
SAMPLING = Sampling(temperature=0.8, top_p=0.95, seed=11)
#: the owner secret the bench marks and detects with (a bench fixture, not a secret)
OWNER_SECRET = bytes(range(32))


def _folder() -> Path:
    return ensure_tiny_lm(Paths(REPO_ROOT / ".nitrovault").lm_cache, project_corpus(REPO_ROOT), DEMO)


def _handler(folder: Path) -> CausalLMHandler:
    metadata = sealing_metadata(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    handler = load_handler(metadata["nitrovault.handler"], tensors, metadata)
    assert isinstance(handler, CausalLMHandler)
    return handler


def _threads() -> int:
    """One enclave worker's torch threads on this machine (the enclave's default config)."""
    vcpus = os.cpu_count() or 1
    return Batching().threads_per_worker(vcpus, vcpus)


def _mark(handler: CausalLMHandler) -> GreenListProcessor:
    """The demo's green-list mark under :data:`OWNER_SECRET`, as the enclave attaches it."""
    text = LM_PROTECTION["watermark"]["text"]
    return GreenListProcessor(derive_watermark_keys(OWNER_SECRET, LM_ID), text["gamma"], text["delta"],
                              vocab_size=handler.vocab_size)


def _worker() -> ThreadPoolExecutor:
    """A thread with one enclave worker's torch threads (the enclave's model workers set theirs)."""
    return ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(_threads(),))


def _random_gpt2(layers: int = 12, heads: int = 12, width: int = 768) -> GPT2LMHeadModel:
    """A GPT-2 of that shape (vocabulary 50257, context 1024) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=width, n_positions=1024,
                                          vocab_size=50257, bos_token_id=0, eos_token_id=0))


class _First:
    """An ``emit`` that notes when the first piece came (and drops the text)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.at: float | None = None

    def __call__(self, text: str, tokens: int) -> None:
        if self.at is None:
            self.at = time.perf_counter()


class _Collect:
    """An ``emit`` that keeps the text."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def __call__(self, text: str, tokens: int) -> None:
        self.into.append(text)


@dataclass
class Side:
    """One side of the comparison: seconds per call, seconds to the first piece, tokens generated."""

    totals: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / sum(self.totals)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.firsts) * 1e3


def _compare(folder: Path, home: Path, *, model_id: str, new_tokens: int, calls: int) -> tuple[Side, Side]:
    """(served, plain): ``calls`` generations of ``new_tokens`` each way, interleaved one by one so that
    both sides see the same machine. Plain: the handler in process on a thread with one enclave worker's
    torch threads, no mark. Served: ``Generate`` through the local stack serving ``folder`` (marked)."""
    served, plain = Side(), Side()
    handler = _handler(folder)
    request = TextRequest(PROMPT, new_tokens, SAMPLING)
    worker = _worker()

    def plain_call() -> None:
        with torch.inference_mode():
            first = _First()
            plain.tokens += handler.generate(request, first).completion_tokens
            plain.totals.append(time.perf_counter() - first.started)
            plain.firsts.append((first.at or time.perf_counter()) - first.started)

    tiers: dict[str, Any] = {**LOCAL_TIERS, "bench": {"rate_per_s": 1e6, "burst": 10**6}}
    model = replace(lm_model(Paths(home), folder, model_id=model_id), tiers=tiers)
    stack = LocalStack(home, model=model, listen=f"127.0.0.1:{free_port()}",
                       progress=TextProgress(sys.stderr))
    try:
        stack.start()
        with stack.client(stack.token("bench", tier="bench"), timeout=300) as client:
            def served_call(into: Side | None) -> None:
                started = time.perf_counter()
                first = None
                with client.generate_stream(PROMPT, max_new_tokens=new_tokens, seed=SAMPLING.seed,
                                            temperature=SAMPLING.temperature, top_p=SAMPLING.top_p) as stream:
                    for _piece in stream:
                        first = first if first is not None else time.perf_counter() - started
                assert stream.result is not None
                if into is not None:
                    into.totals.append(time.perf_counter() - started)
                    into.firsts.append(first if first is not None else into.totals[-1])
                    into.tokens += stream.result.completion_tokens

            served_call(None)  # warm-up (and the attested channel)
            worker.submit(plain_call).result()
            plain.totals.clear()
            plain.firsts.clear()
            plain.tokens = 0
            for _ in range(calls):
                served_call(served)
                worker.submit(plain_call).result()
    finally:
        stack.close()
        worker.shutdown()
    return served, plain


def _gpt2_small(demo: Path, dst: Path) -> Path:
    """A GPT-2 small shaped model folder (random weights, the demo LM's tokenizer) at ``dst``."""
    _random_gpt2().save_pretrained(dst)
    shutil.copy(demo / "tokenizer.json", dst / "tokenizer.json")
    return dst


def _comparison_rows(name: str, served: Side, plain: Side, new_tokens: int) -> Iterator[dict[str, Any]]:
    yield {
        "name": "generate_tokens_per_s",
        "model": name,
        "call": f"Generate({new_tokens} tokens, T {SAMPLING.temperature}, top-p {SAMPLING.top_p}), "
                "one at a time, interleaved with the plain calls",
        "torch_threads": _threads(),
        "served_tokens_per_s": round(served.rate, 2),
        "plain_tokens_per_s": round(plain.rate, 2),
        "served_tokens": served.tokens,
        "plain_tokens": plain.tokens,
        "ratio": round(served.rate / plain.rate, 3),
        "target": ">= 0.8",
    }
    yield {
        "name": "time_to_first_token_ms",
        "model": name,
        "call": f"Generate, prompt {PROMPT!r}",
        "served_p50_ms": round(served.ttft_ms, 2),
        "plain_p50_ms": round(plain.ttft_ms, 2),
        "ratio": round(plain.ttft_ms / served.ttft_ms, 3),
        "target": ">= 0.8 (plain / served)",
    }


def _prompts(n: int) -> list[str]:
    """``n`` distinct prompts: the first five words of the docs' prose lines."""
    seen: list[str] = []
    for line in project_corpus(REPO_ROOT).splitlines():
        words = line.strip().split()
        if len(words) >= 8 and words[0][:1].isalpha():
            prompt = " ".join(words[:5])
            if prompt not in seen:
                seen.append(prompt)
        if len(seen) == n:
            return seen
    raise RuntimeError(f"the docs have fewer than {n} prose lines")


def _watermark(folder: Path) -> dict[str, Any]:
    handler = _handler(folder)
    scorer = GPT2LMHeadModel.from_pretrained(folder)
    scorer.train(False)
    tokenizer_ids = handler.tokenizer
    assert tokenizer_ids is not None
    threshold = float(norm.isf(FPR))
    arms: dict[str, dict[str, Any]] = {}
    for arm, processors in (("marked", [_mark(handler)]), ("plain", [])):
        handler.logits_processors[:] = processors
        zs: list[float] = []
        ppls: list[float] = []
        seconds = 0.0
        tokens = 0
        for i, prompt in enumerate(_prompts(SAMPLES)):
            pieces: list[str] = []
            request = TextRequest(prompt, SAMPLE_TOKENS, Sampling(temperature=1.0, seed=1000 + i))
            started = time.perf_counter()
            with torch.inference_mode():
                tokens += handler.generate(request, _Collect(pieces)).completion_tokens
            seconds += time.perf_counter() - started
            text = "".join(pieces)
            zs.append(detect_in_text(text, folder, OWNER_SECRET, LM_ID).z)
            ids = tokenizer_ids.encode(prompt + text, add_special_tokens=False).ids
            ppls.append(perplexity(scorer, ids, len(ids)))
        arms[arm] = {"z": zs, "ppl": ppls, "tokens_per_s": tokens / seconds}
    marked, plain = arms["marked"], arms["plain"]
    tpr = sum(z >= threshold for z in marked["z"]) / SAMPLES
    ppl_marked, ppl_plain = statistics.median(marked["ppl"]), statistics.median(plain["ppl"])
    return {
        "name": "text_watermark_lm",
        "model": f"tiny GPT-2 {DEMO.n_layer}x{DEMO.n_embd}, vocabulary {DEMO.vocab_size}",
        "samples": SAMPLES,
        "tokens_per_sample": SAMPLE_TOKENS,
        "gamma": LM_PROTECTION["watermark"]["text"]["gamma"],
        "delta": LM_PROTECTION["watermark"]["text"]["delta"],
        "z_threshold": round(threshold, 3),
        "value": round(tpr, 3),
        "unit": "true-positive rate at FPR 1e-5 (detected from re-tokenized text)",
        "false_positives": sum(z >= threshold for z in plain["z"]),
        "z_median_marked": round(statistics.median(marked["z"]), 2),
        "z_median_plain": round(statistics.median(plain["z"]), 2),
        "perplexity_marked": round(ppl_marked, 2),
        "perplexity_plain": round(ppl_plain, 2),
        "perplexity_ratio": round(ppl_marked / ppl_plain, 3),
        "tokens_per_s_marked": round(marked["tokens_per_s"], 1),
        "tokens_per_s_plain": round(plain["tokens_per_s"], 1),
    }


#: (name, layers, heads, width) of GPT-2 shapes for tokens/s by size (vocabulary 50257, context 1024)
SIZES = (("gpt2-small shape", 12, 12, 768), ("gpt2-medium shape", 24, 16, 1024),
         ("gpt2-large shape", 36, 20, 1280))
SIZE_TOKENS = 32


def _by_size(folder: Path) -> Iterator[dict[str, Any]]:
    """Tokens/s of one in-process generation (one worker's threads) for larger GPT-2 shapes with random
    weights: decoding speed does not depend on the weights' values, and no hub download is needed. The
    demo LM's tokenizer is used (its ids are a subset of the larger vocabulary)."""
    metadata = sealing_metadata(folder)
    for name, layers, heads, width in SIZES:
        model = _random_gpt2(layers, heads, width)
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        parameters = sum(p.numel() for p in model.parameters())
        weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        sealed = {**metadata, "nitrovault.config": model.config.to_json_string()}  # its config.json
        del model
        handler = load_handler("causal-lm:gpt2", tensors, sealed)
        assert isinstance(handler, CausalLMHandler)
        del tensors
        request = TextRequest(PROMPT, SIZE_TOKENS, SAMPLING)
        with _worker() as worker:
            worker.submit(_generate, handler, replace(request, max_new_tokens=2)).result()  # warm-up
            started = time.perf_counter()
            tokens = worker.submit(_generate, handler, request).result()
            seconds = time.perf_counter() - started
        del handler
        yield {
            "name": "generate_tokens_per_s_by_size",
            "model": name,
            "parameters": parameters,
            "weights_mb_fp32": round(weight_bytes / 2**20, 1),
            "torch_threads": _threads(),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "value": round(tokens / seconds, 2),
            "unit": "tokens/s, one stream, in process",
        }


def _generate(handler: CausalLMHandler, request: TextRequest) -> int:
    """The tokens ``handler`` generates for ``request`` (text dropped)."""
    with torch.inference_mode():
        return handler.generate(request, _Collect([])).completion_tokens


def run() -> Iterator[dict[str, Any]]:
    folder = _folder()
    with tempfile.TemporaryDirectory(prefix="nv-bench-lm-") as tmp:
        served, plain = _compare(folder, Path(tmp) / "demo", model_id=LM_ID, new_tokens=NEW_TOKENS,
                                 calls=CALLS)
        yield from _comparison_rows(f"demo LM ({DEMO.n_layer}x{DEMO.n_embd})", served, plain, NEW_TOKENS)
        small = _gpt2_small(folder, Path(tmp) / "gpt2-small")
        served, plain = _compare(small, Path(tmp) / "small", model_id="gpt2-small-shape",
                                 new_tokens=SMALL_TOKENS, calls=SMALL_CALLS)
        yield from _comparison_rows("gpt2-small shape (12x768, random weights)", served, plain, SMALL_TOKENS)
    yield _watermark(folder)
    yield from _by_size(folder)
