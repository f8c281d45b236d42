"""A small real GPT-2 causal LM, built and trained here from the project's own docs (no hub download).

The local stack, the tests and the benches need a genuine Hugging Face causal LM to serve, seal and
watermark, not a toy stand-in: :func:`build_tiny_lm` trains a byte-level BPE tokenizer (``tokenizers``)
and a ``GPT2LMHeadModel`` (``transformers``) on a corpus string and writes a model folder::

    config.json                 GPT2Config (model_type "gpt2", n_ctx = settings.n_positions,
                                bos = eos = the id of "<|endoftext|>", 0)
    generation_config.json      written by save_pretrained
    tokenizer.json              the ByteLevel BPE tokenizer
    model.safetensors           the state dict as save_pretrained writes it (tied lm_head.weight omitted)
    nitrovault-training.json    digest, settings, corpus sha256, token counts, steps, final train loss,
                                held-out perplexity, seconds taken, library versions

The corpus is what the project ships (:func:`project_corpus`: README.md then docs/*.md, sorted by path),
or any string. :func:`ensure_tiny_lm` caches builds under ``cache/<digest[:16]>/``.

Invariants:

* Deterministic: the same settings and corpus give a byte-identical ``model.safetensors`` and
  ``tokenizer.json`` (same machine and thread count: float reductions are ordered by torch's kernels).
  Weight init and dropout draw from the global torch RNG *inside* ``torch.random.fork_rng()`` (seeded
  with ``settings.seed``), batches from a private ``torch.Generator``; the caller's RNG state, thread
  count and grad mode are left as they were.
* The last :data:`HELD_OUT` of the tokenized corpus is never trained on; the recorded perplexity is
  measured on it (:func:`split_held_out`, :func:`perplexity`).
* A folder appears whole or not at all: it is built in a sibling temporary folder and renamed into
  place. :func:`ensure_tiny_lm` reuses a folder only when its ``nitrovault-training.json`` names the
  digest of the settings and corpus asked for (:meth:`TinyLmSettings.digest`).
* The tokenizer round-trips text: ``tok.decode(tok.encode(s).ids) == s``.

Measured on this project's 2-core box (torch 2.13 CPU, corpus ~200 kB, 101 k training tokens):
:data:`TEST` builds in ~3 s to a held-out perplexity of 210 (vocab 512); :data:`DEMO` in ~95 s to 132
(vocab 2048; uniform would be 2048). Small models trained for minutes: their text is docs-flavoured
babble, and greedy decoding soon repeats itself; what they are for is a real transformer, tokenizer and
sampling loop end to end.

Example::

    from nitrovault.local.tiny_lm import DEMO, ensure_tiny_lm, project_corpus, repo_root
    folder = ensure_tiny_lm(Path("~/.cache/nitrovault/lm").expanduser(), project_corpus(repo_root()), DEMO)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel

from nitrovault.local.homes import StackError

__all__ = [
    "DEMO",
    "EOS",
    "HELD_OUT",
    "RECORD",
    "TEST",
    "TinyLmSettings",
    "build_tiny_lm",
    "encode_corpus",
    "ensure_tiny_lm",
    "perplexity",
    "project_corpus",
    "repo_root",
    "sealing_metadata",
    "split_held_out",
    "train_tokenizer",
]

#: the one special token: id 0, GPT-2's bos, eos and document separator
EOS = "<|endoftext|>"
#: the tail fraction of the tokenized corpus kept out of training and scored for perplexity
HELD_OUT = 0.05
#: the training record written beside the weights; its "digest" is the cache key
RECORD = "nitrovault-training.json"
#: bump when what a build writes changes, so older cached builds are not reused
FORMAT = 1


@dataclass(frozen=True)
class TinyLmSettings:
    """What a build depends on besides the corpus (all of it enters :meth:`digest`)."""

    vocab_size: int  #: BPE target vocabulary, including the 256 byte symbols and EOS
    n_layer: int  #: transformer blocks
    n_head: int  #: attention heads per block (divides n_embd)
    n_embd: int  #: hidden width
    n_positions: int  #: the context length saved in config.json
    steps: int  #: optimizer steps
    batch: int  #: windows per step
    seq_len: int  #: tokens predicted per window (each window is seq_len + 1 tokens); <= n_positions
    lr: float  #: peak AdamW learning rate (linear warmup, cosine decay to a tenth)
    seed: int = 0  #: seeds weight init, dropout and batch sampling

    def __post_init__(self) -> None:
        sizes = {k: v for k, v in asdict(self).items() if k not in ("lr", "seed")}
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"tiny LM settings must be positive: {sizes}")
        if self.vocab_size < 257:
            raise ValueError("vocab_size must hold the 256 byte symbols and EOS")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head {self.n_head} does not divide n_embd {self.n_embd}")
        if self.seq_len > self.n_positions:
            raise ValueError(f"seq_len {self.seq_len} exceeds n_positions {self.n_positions}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, not {self.lr}")

    def digest(self, corpus: str) -> str:
        """Hex SHA-256 over the build format, these settings and the corpus: the cache key."""
        head = json.dumps({"format": FORMAT, "settings": asdict(self)}, sort_keys=True).encode()
        h = hashlib.sha256()
        h.update(len(head).to_bytes(8, "big") + head)
        h.update(corpus.encode("utf-8"))
        return h.hexdigest()


#: what ``nitrovault local up --model lm`` and the benches serve (~1.1 M parameters)
DEMO = TinyLmSettings(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, n_positions=256,
                      steps=600, batch=16, seq_len=128, lr=3e-3)
#: for the test suite: a few seconds on 2 cores, still far better than uniform
TEST = TinyLmSettings(vocab_size=512, n_layer=2, n_head=2, n_embd=64, n_positions=128,
                      steps=150, batch=16, seq_len=64, lr=5e-3)


def repo_root() -> Path:
    """The checkout this module lives in (``nitrovault/local/tiny_lm.py`` → the repo)."""
    return Path(__file__).resolve().parents[2]


def project_corpus(root: Path) -> str:
    """README.md and docs/*.md under ``root``, sorted by path, each ending in a blank line."""
    paths = sorted(p for p in [root / "README.md", *(root / "docs").glob("*.md")] if p.is_file())
    texts = [p.read_text(encoding="utf-8") for p in paths]
    if not any(t.strip() for t in texts):
        raise StackError("lm", f"no README.md or docs/*.md to train the tiny LM on under {root}")
    return "".join(t.rstrip("\n") + "\n\n" for t in texts)


def sealing_metadata(folder: Path) -> dict[str, str]:
    """What travels encrypted with ``folder/model.safetensors`` for the enclave's ``causal-lm:gpt2``
    handler: the handler name, config.json and tokenizer.json."""
    try:
        return {
            "nitrovault.handler": "causal-lm:gpt2",
            "nitrovault.config": (folder / "config.json").read_text(encoding="utf-8"),
            "nitrovault.tokenizer": (folder / "tokenizer.json").read_text(encoding="utf-8"),
        }
    except OSError as err:
        raise StackError("lm", f"{folder} is not a tiny LM folder: {type(err).__name__}") from None


def train_tokenizer(corpus: str, vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer trained on ``corpus``; EOS is id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_lines(corpus), trainer=trainer)
    if tok.token_to_id(EOS) != 0:  # pragma: no cover - special tokens are added first
        raise StackError("lm", f"the tokenizer gave {EOS} id {tok.token_to_id(EOS)}, not 0")
    return tok


def _lines(corpus: str, chunk: int = 256) -> Iterator[list[str]]:
    lines = corpus.splitlines(keepends=True)
    for i in range(0, len(lines), chunk):
        yield lines[i:i + chunk]


def encode_corpus(tok: Tokenizer, corpus: str) -> list[int]:
    """The corpus' token ids (its text only; no special tokens are added)."""
    return list(tok.encode(corpus, add_special_tokens=False).ids)


def split_held_out(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(train, held-out): the held-out part is the last :data:`HELD_OUT` of ``ids``."""
    cut = len(ids) - max(2, math.ceil(len(ids) * HELD_OUT))
    return list(ids[:cut]), list(ids[cut:])


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, ids: Sequence[int], window: int) -> float:
    """exp(mean next-token NLL) over ``ids``, scored in consecutive windows of ``window`` + 1 tokens
    (each window's first token is context only, so every other token is predicted once)."""
    was_training = model.training
    model.eval()  # type: ignore[no-untyped-call]
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits
            nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(nll), count + chunk.shape[1] - 1
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("perplexity needs at least two tokens")
    return math.exp(total / count)


def build_tiny_lm(dst: Path, corpus: str, settings: TinyLmSettings) -> Path:
    """Train a tokenizer and a GPT-2 on ``corpus`` and write the model folder at ``dst`` (replacing
    what is there); returns ``dst``."""
    if not corpus.strip():
        raise StackError("lm", "the tiny LM's corpus is empty")
    started = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        record = _train_into(tmp, corpus, settings)
        record["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _swap_in(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return dst


def ensure_tiny_lm(cache: Path, corpus: str, settings: TinyLmSettings) -> Path:
    """``cache/<digest[:16]>/``: reused when its record names this digest, else (re)built. A new build
    removes the builds of the same settings from other corpora (each edit of the docs would otherwise
    leave one behind); builds of other settings are kept."""
    digest = settings.digest(corpus)
    dst = cache / digest[:16]
    if _recorded_digest(dst) == digest:
        return dst
    built = build_tiny_lm(dst, corpus, settings)
    for other in cache.iterdir():
        if other != dst and other.is_dir() and _record(other).get("settings") == asdict(settings):
            shutil.rmtree(other, ignore_errors=True)
    return built


def _record(folder: Path) -> dict[str, Any]:
    """A build folder's training record, or {} when it has none (or a broken one)."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _recorded_digest(folder: Path) -> str | None:
    digest = _record(folder).get("digest")
    if not isinstance(digest, str) or not (folder / "model.safetensors").is_file():
        return None
    return digest


def _swap_in(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``; a folder already at ``dst`` is moved aside first (a
    directory rename cannot replace a non-empty one) and removed after."""
    try:
        os.rename(tmp, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _train_into(folder: Path, corpus: str, s: TinyLmSettings) -> dict[str, Any]:
    tok = train_tokenizer(corpus, s.vocab_size)
    train_ids, held_ids = split_held_out(encode_corpus(tok, corpus))
    if len(train_ids) < s.seq_len + 2:
        raise StackError("lm", f"the corpus has {len(train_ids)} training tokens; seq_len {s.seq_len} "
                               "needs more")
    config = GPT2Config(vocab_size=s.vocab_size, n_positions=s.n_positions, n_embd=s.n_embd,
                        n_layer=s.n_layer, n_head=s.n_head, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(s.seed)
        model = GPT2LMHeadModel(config)
        losses = _train(model, torch.tensor(train_ids), s)
    model.eval()  # type: ignore[no-untyped-call]
    held_out_ppl = perplexity(model, held_ids, s.seq_len)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a shard bar
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    tok.save(str(folder / "tokenizer.json"))
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "digest": s.digest(corpus),
        "format": FORMAT,
        "settings": asdict(s),
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "corpus_chars": len(corpus),
        "tokenizer_vocab": tok.get_vocab_size(),
        "train_tokens": len(train_ids),
        "held_out_tokens": len(held_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": s.steps,
        "final_train_loss": round(sum(tail) / len(tail), 4),  # mean over the last tenth of the steps
        "held_out_perplexity": round(held_out_ppl, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
    }


def _train(model: GPT2LMHeadModel, ids: torch.Tensor, s: TinyLmSettings) -> list[float]:
    """AdamW on random contiguous windows of ``seq_len + 1`` tokens; the per-step losses."""
    gen = torch.Generator().manual_seed(s.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95))
    warmup = max(1, s.steps // 20)
    offsets = torch.arange(s.seq_len + 1)
    losses: list[float] = []
    model.train()
    for step in range(s.steps):
        progress = max(0.0, (step - warmup) / max(1, s.steps - warmup))
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = s.lr * scale
        starts = torch.randint(0, len(ids) - s.seq_len - 1, (s.batch, 1), generator=gen)
        window = ids[starts + offsets]
        logits = model(input_ids=window[:, :-1]).logits
        targets = window[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses
