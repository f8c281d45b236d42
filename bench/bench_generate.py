"""What streaming generation costs through nitrovault, and what the text watermark costs and buys
(``python -m bench.run generate``).

The model is the demo LM of ``nitrovault local up --model lm`` (:data:`nitrovault.local.tiny_lm.DEMO`, a
4-layer GPT-2 trained on the project's docs; built once into ``.nitrovault/owner/lm``, ~95 s, then
reused).

* ``generate_tokens_per_s``: tokens per second of one ``Generate`` stream at a time through the whole
  local stack (relay, TLS into the enclave, token, per-token charging, the green-list mark, receipt over
  the transcript, audit) vs the same handler over the same weights called in process with the same
  settings and the same torch threads as one enclave worker, without the mark (with it: beside, as
  ``plain_marked_tokens_per_s``). Target >= 0.8.
* ``time_to_first_token_ms``: median time from sending the request to the first text piece, same two
  sides; ``ratio`` = plain / stack (higher is better, like the first), target >= 0.8.
* ``text_watermark_lm``: in process, :data:`SAMPLES` continuations of distinct prompts from the docs with
  the mark (gamma 0.25, delta 2) and as many without; each text re-tokenized as the owner would from the
  text alone and z-tested. ``value`` = the true-positive rate at a false-positive rate of 1e-5
  (z >= 4.265); the measured false positives of the unmarked texts beside it; the perplexity cost is the
  unmarked model's perplexity of marked texts over that of unmarked ones.

Every call samples with the same settings and seed (temperature 0.8, top-p 0.95); the mark changes which
tokens are drawn, so counts may differ by an early end-of-text, and rates are tokens over seconds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from scipy.stats import norm
from transformers import GPT2LMHeadModel

from enclave_app.config import Batching
from enclave_app.models import load_handler
from enclave_app.models.causal_lm import CausalLMHandler, TextRequest
from enclave_app.models.generation import Sampling
from enclave_app.models.green_list import GreenListProcessor
from nitrovault.client import GenerateStream
from nitrovault.local.homes import Paths
from nitrovault.local.lm_demo import LM_ID, LM_PROTECTION, detect_in_text, lm_model
from nitrovault.local.provision import LOCAL_TIERS
from nitrovault.local.stack import REPO_ROOT, LocalStack, TextProgress
from nitrovault.local.tiny_lm import DEMO, ensure_tiny_lm, perplexity, project_corpus, sealing_metadata
from nitrovault.watermark import derive_watermark_keys

PROMPT = "The enclave attests to KMS"
NEW_TOKENS = 128
CALLS = 12
SAMPLES = 40
SAMPLE_TOKENS = 160
FPR = 1e-5
SAMPLING = Sampling(temperature=0.8, top_p=0.95, seed=11)


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


def _marked(handler: CausalLMHandler) -> CausalLMHandler:
    """``handler`` with the demo's green-list mark in its generation loop (as the enclave attaches it)."""
    text = LM_PROTECTION["watermark"]["text"]
    handler.logits_processors[:] = [GreenListProcessor(derive_watermark_keys(bytes(range(32)), LM_ID),
                                                       text["gamma"], text["delta"],
                                                       vocab_size=handler.vocab_size)]
    return handler


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


def _plain(handler: CausalLMHandler) -> tuple[list[float], list[float], int]:
    """(seconds per call, seconds to the first piece, tokens) of CALLS in-process generations, run on a
    thread with one worker's torch threads, like an enclave worker."""
    totals: list[float] = []
    firsts: list[float] = []
    tokens = [0]

    def work() -> None:
        torch.set_num_threads(_threads())
        request = TextRequest(PROMPT, NEW_TOKENS, SAMPLING)
        with torch.inference_mode():
            handler.generate(request, lambda text, n: None)  # warm-up
            for _ in range(CALLS):
                first = _First()
                done = handler.generate(request, first)
                totals.append(time.perf_counter() - first.started)
                firsts.append((first.at or time.perf_counter()) - first.started)
                tokens[0] += done.completion_tokens

    thread = threading.Thread(target=work, name="plain-generate")
    thread.start()
    thread.join()
    return totals, firsts, tokens[0]


def _served(folder: Path, home: Path) -> tuple[list[float], list[float], int]:
    tiers: dict[str, Any] = {**LOCAL_TIERS, "bench": {"rate_per_s": 1e6, "burst": 10**6}}
    model = replace(lm_model(Paths(home), folder), tiers=tiers)
    stack = LocalStack(home, model=model, listen="127.0.0.1:50171", progress=TextProgress(sys.stderr))
    totals: list[float] = []
    firsts: list[float] = []
    tokens = 0
    try:
        stack.start()
        with stack.client(stack.token("bench", tier="bench"), timeout=120) as client:
            def stream_of() -> GenerateStream:
                return client.generate_stream(PROMPT, max_new_tokens=NEW_TOKENS, seed=SAMPLING.seed,
                                              temperature=SAMPLING.temperature, top_p=SAMPLING.top_p)

            with stream_of() as warm_up:  # and the attested channel
                list(warm_up)
            for _ in range(CALLS):
                started = time.perf_counter()
                first = None
                with stream_of() as stream:
                    for _piece in stream:
                        first = first if first is not None else time.perf_counter() - started
                totals.append(time.perf_counter() - started)
                firsts.append(first if first is not None else totals[-1])
                assert stream.result is not None
                tokens += stream.result.completion_tokens
    finally:
        stack.close()
    return totals, firsts, tokens


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
    secret = bytes(range(32))
    handler = _handler(folder)
    scorer = GPT2LMHeadModel.from_pretrained(folder)
    scorer.train(False)
    tokenizer_ids = handler.tokenizer
    assert tokenizer_ids is not None
    mark = list(_marked(handler).logits_processors)
    threshold = float(norm.isf(FPR))
    arms: dict[str, dict[str, list[float]]] = {}
    for arm, processors in (("marked", mark), ("plain", [])):
        handler.logits_processors[:] = processors
        zs: list[float] = []
        ppls: list[float] = []
        for i, prompt in enumerate(_prompts(SAMPLES)):
            pieces: list[str] = []
            request = TextRequest(prompt, SAMPLE_TOKENS, Sampling(temperature=1.0, seed=1000 + i))
            with torch.inference_mode():
                handler.generate(request, _Collect(pieces))
            text = "".join(pieces)
            zs.append(detect_in_text(text, folder, secret, LM_ID).z)
            ids = tokenizer_ids.encode(prompt + text, add_special_tokens=False).ids
            ppls.append(perplexity(scorer, ids, len(ids)))
        arms[arm] = {"z": zs, "ppl": ppls}
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
    }


def run() -> Iterator[dict[str, Any]]:
    folder = _folder()
    plain_totals, plain_firsts, plain_tokens = _plain(_handler(folder))
    marked_totals, _, marked_tokens = _plain(_marked(_handler(folder)))
    with tempfile.TemporaryDirectory(prefix="nv-bench-lm-") as tmp:
        served_totals, served_firsts, served_tokens = _served(folder, Path(tmp) / "home")
    served_rate = served_tokens / sum(served_totals)
    plain_rate = plain_tokens / sum(plain_totals)
    yield {
        "name": "generate_tokens_per_s",
        "call": f"Generate({NEW_TOKENS} tokens, T {SAMPLING.temperature}, top-p {SAMPLING.top_p}), "
                "one at a time",
        "torch_threads": _threads(),
        "served_tokens_per_s": round(served_rate, 1),
        "plain_tokens_per_s": round(plain_rate, 1),
        "plain_marked_tokens_per_s": round(marked_tokens / sum(marked_totals), 1),
        "served_tokens": served_tokens,
        "plain_tokens": plain_tokens,
        "ratio": round(served_rate / plain_rate, 3),
        "target": ">= 0.8",
    }
    served_ttft = statistics.median(served_firsts) * 1e3
    plain_ttft = statistics.median(plain_firsts) * 1e3
    yield {
        "name": "time_to_first_token_ms",
        "call": f"Generate, prompt {PROMPT!r}",
        "served_p50_ms": round(served_ttft, 2),
        "plain_p50_ms": round(plain_ttft, 2),
        "ratio": round(plain_ttft / served_ttft, 3),
        "target": ">= 0.8 (plain / served)",
    }
    yield _watermark(folder)
