"""``nitrovault watermark ...``: mark a model's weights before sealing; test suspects for the owner's marks.

The I/O shell around :mod:`nitrovault.watermark` (safetensors files, key files, JSON token files). The key
file holds the owner secret (32+ raw bytes or hex); per-model keys are derived from it and ``--model-id``,
which must be the same when embedding and detecting.

    nitrovault watermark keygen -o owner.key
    nitrovault watermark embed model.safetensors --key-file owner.key --model-id m -o marked.safetensors
    nitrovault watermark detect suspect.safetensors --key-file owner.key --model-id m \
        --reference model.safetensors
    nitrovault watermark detect-text --key-file owner.key --model-id m --vocab-size 50257 --tokens ids.json
    nitrovault watermark detect-embeddings --key-file owner.key --model-id m --candidates words.txt \
        --endpoint suspect.example:443 --expect-pcr 0=... --token-file suspect.token

``detect-embeddings`` asks a suspect embedding service (a nitrovault-compatible ``Embed`` endpoint) for
the EmbMarker verification texts (``--texts-out`` writes them for a service of another kind; its answers
then come back with ``--embeddings answers.npz`` holding ``backdoor`` and ``benign`` arrays) and runs the
KS test. ``--endpoint`` verifies the service first like every nitrovault client (the trust options of
:mod:`nitrovault.cli.client_cmd`: ``--expect-pcr``/``--pcr-manifest``, ``--root``, ``--ca-file``,
``--server-name``, ``--no-verify-receipts``), so the answers provably come from the attested enclave.
``detect``, ``detect-text`` and ``detect-embeddings`` exit 0 when the mark is found, 1 when it is not
(like grep), 2 on usage errors and on any failure to get answers (the endpoint failed verification, a call
failed: one line ``error: <step>: <message>``), so that "not marked" is never a failed verification.

``trace`` names the subject behind outputs served with per-subject marks (``per_subject`` in the
policy; docs/watermarks.md, "Per-subject output fingerprints"):

    nitrovault watermark trace --key-file owner.key --model-id m --subjects subjects.txt \
        --embeddings leaked.jsonl --candidates words.txt
    nitrovault watermark trace --key-file owner.key --model-id m --subjects subjects.txt \
        --tokens ids.json --vocab-size 50257

``--subjects``: a file with one subject per line, exactly as the access tokens' ``sub`` (surrounding
whitespace and blank lines ignored; no commas as separators, since a subject may contain one).
``--embeddings``: JSON lines ``{"text": "...", "embedding": [...]}``, the texts and what the suspect
answered for them. ``--candidates``: the candidate words sealed with the model, whitespace-separated or a
JSON list (the sealed metadata's own ``nitrovault.watermark.candidates``). Exit 0 when a subject is
named, 1 when none is, 2 on bad input (corrupt or inconsistent files, an empty or repeated subject, a
token outside the vocabulary).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import torch
import typer
from safetensors import safe_open
from safetensors.torch import save_file

from nitrovault.cli.client_cmd import (
    CaFile,
    ExpectPcr,
    NoVerifyReceipts,
    PcrManifest,
    Root,
    ServerName,
    build_expect,
    verified_client,
)
from nitrovault.errors import NitrovaultError
from nitrovault.watermark.embedding import (
    derive_embedding_mark,
    detect_embedding_mark,
    trace_embedding_subjects,
    verification_texts,
)
from nitrovault.watermark.keys import WatermarkKeys, derive_watermark_keys, parse_key_file
from nitrovault.watermark.subjects import DEFAULT_TRACE_THRESHOLD
from nitrovault.watermark.text import (
    DEFAULT_GAMMA,
    DEFAULT_Z_THRESHOLD,
    GreenList,
    detect_text_mark,
    trace_text_subjects,
)
from nitrovault.watermark.weights import (
    DEFAULT_BITS,
    DEFAULT_P_THRESHOLD,
    DEFAULT_STRENGTH,
    detect_weight_mark,
    embed_weight_mark,
)

app = typer.Typer(no_args_is_help=True,
                  help="Ownership watermarks: weights (embed/detect), generated text, per-subject trace.")

KeyFile = Annotated[Path, typer.Option("--key-file", exists=True, dir_okay=False,
                                       help="Owner secret: 32+ raw bytes or hex.")]
ModelId = Annotated[str, typer.Option("--model-id", help="Model id bound into the derived keys.")]
Bits = Annotated[int, typer.Option("--bits", help="Watermark bits (8..256).")]
Layers = Annotated[list[str] | None, typer.Option(
    "--layer", help="Repeatable: tensors to mark (default: every 2-D float tensor with >= 256 entries).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _keys(key_file: Path, model_id: str) -> WatermarkKeys:
    try:
        return derive_watermark_keys(parse_key_file(key_file.read_bytes()), model_id)
    except NitrovaultError as exc:
        raise typer.BadParameter(str(exc), param_hint="--key-file") from None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensors[name] = f.get_tensor(name)
    return tensors, metadata


def _as_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Floating tensors as float32 arrays (bf16/f16 included), others as they are."""
    return {
        n: (t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy())
        for n, t in tensors.items()
    }


def _verdict(report: dict[str, object], detected: bool, as_json: bool, summary: str) -> NoReturn:
    """Print a detection (one JSON object, or the verdict and ``summary``); exit 0 if marked, else 1."""
    if as_json:
        typer.echo(json.dumps(report, sort_keys=True))
    else:
        typer.echo(f"{'MARKED' if detected else 'not marked'}: {summary}")
    raise typer.Exit(0 if detected else 1)


def _token_ids(path: Path) -> list[int]:
    """The token ids of a JSON file: a list of ids, or ``{"tokens": [...]}``."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise typer.BadParameter("not a JSON file", param_hint="--tokens") from None
    ids = data.get("tokens") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise typer.BadParameter("expected a JSON list of integer token ids", param_hint="--tokens")
    return ids


def _candidate_words(path: Path) -> list[str]:
    """Candidate words: a JSON list of strings (as sealed) or whitespace-separated words."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise typer.BadParameter("not a text file", param_hint="--candidates") from None
    if not text.lstrip().startswith("["):
        return text.split()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, list) or not all(isinstance(w, str) for w in data):
        raise typer.BadParameter("a JSON candidates file must be a list of strings",
                                 param_hint="--candidates")
    return data


def _fail(exc: NitrovaultError) -> typer.Exit:
    typer.echo(exc.diagnostics(), err=True)
    return typer.Exit(2)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("-o", "--out", dir_okay=False, help="Where to write the secret.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a new 256-bit owner secret (hex, mode 0600)."""
    if out.exists() and not force:
        raise typer.BadParameter(f"{out} exists (use --force)", param_hint="--out")
    out.touch(mode=0o600, exist_ok=True)
    out.write_text(secrets.token_hex(32) + "\n")
    typer.echo(str(out))


@app.command()
def embed(
    model: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="safetensors model to mark.")],
    key_file: KeyFile,
    out: Annotated[Path, typer.Option("-o", "--out", dir_okay=False, help="Marked safetensors file.")],
    model_id: ModelId = "default",
    strength: Annotated[float, typer.Option(
        "--strength", help="Bit margin in null standard deviations (higher: more robust, larger change).")
    ] = DEFAULT_STRENGTH,
    bits: Bits = DEFAULT_BITS,
    layer: Layers = None,
    as_json: AsJson = False,
) -> None:
    """Embed the owner's weight watermark (before sealing); tensors keep their names, shapes and dtypes."""
    keys = _keys(key_file, model_id)
    tensors, metadata = _read(model)
    try:
        marked, report = embed_weight_mark(
            _as_numpy(tensors), keys, bits=bits, strength=strength, layers=layer
        )
    except NitrovaultError as exc:
        raise _fail(exc) from None
    result = dict(tensors)
    for name in report.layers:
        result[name] = torch.from_numpy(np.ascontiguousarray(marked[name])).to(tensors[name].dtype)
    save_file(result, str(out), metadata=metadata or None)
    summary = {"out": str(out), "layers": list(report.layers), "coordinates": report.coordinates,
               "bits": report.bits, "strength": report.strength, "moved_bits": report.moved_bits,
               "relative_change": report.relative_change}
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        typer.echo(f"marked {len(report.layers)} tensors ({report.coordinates} weights, {bits} bits), "
                   f"relative change {report.relative_change:.3%} -> {out}")


@app.command()
def detect(
    suspect: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Suspect safetensors model.")],
    key_file: KeyFile,
    model_id: ModelId = "default",
    reference: Annotated[Path | None, typer.Option(
        "--reference", exists=True, dir_okay=False,
        help="The owner's original: re-align permuted hidden units before testing.")] = None,
    bits: Bits = DEFAULT_BITS,
    layer: Layers = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="p-value at or below which the mark is found.")] = DEFAULT_P_THRESHOLD,
    as_json: AsJson = False,
) -> None:
    """Binomial test of the suspect's secret-projection bits; prints p-value and bit error rate."""
    keys = _keys(key_file, model_id)
    tensors = _as_numpy(_read(suspect)[0])
    ref = _as_numpy(_read(reference)[0]) if reference is not None else None
    try:
        result = detect_weight_mark(
            tensors, keys, reference=ref, bits=bits, layers=layer, threshold=threshold
        )
    except NitrovaultError as exc:
        raise _fail(exc) from None
    _verdict(result.as_dict(), result.detected, as_json,
             f"p={result.p_value:.3g} (threshold {threshold:g}), bit error rate "
             f"{result.bit_error_rate:.3f} ({result.matching_bits}/{result.bits} bits), "
             f"realigned layers: {len(result.realigned)}")


@app.command("detect-text")
def detect_text(
    key_file: KeyFile,
    tokens: Annotated[Path, typer.Option("--tokens", exists=True, dir_okay=False,
                                         help="JSON list of token ids (or {\"tokens\": [...]}).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="The generating model's vocabulary size.")],
    model_id: ModelId = "default",
    gamma: Annotated[float, typer.Option("--gamma", help="Green-list fraction used when generating.")
                     ] = DEFAULT_GAMMA,
    threshold: Annotated[float, typer.Option("--threshold", help="z at or above which the mark is found.")
                         ] = DEFAULT_Z_THRESHOLD,
    as_json: AsJson = False,
) -> None:
    """Green-list z-test of generated token ids; prints z and the one-sided p-value."""
    keys = _keys(key_file, model_id)
    ids = _token_ids(tokens)
    try:
        green = GreenList(keys, vocab_size=vocab_size, gamma=gamma)
        result = detect_text_mark(ids, green, threshold=threshold)
    except NitrovaultError as exc:
        raise _fail(exc) from None
    _verdict(result.as_dict(), result.detected, as_json,
             f"z={result.z:.2f} p={result.p_value:.3g} ({result.green}/{result.scored} green, gamma {gamma})")


@app.command("detect-embeddings")
def detect_embeddings(
    key_file: KeyFile,
    candidates: Annotated[Path, typer.Option("--candidates", exists=True, dir_okay=False,
                                             help="The candidate words sealed with the model.")],
    model_id: ModelId = "default",
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Suspect Embed endpoint (host:port).")
                        ] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", exists=True, dir_okay=False,
                                                    help="Bearer token for the endpoint.")] = None,
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    no_verify_receipts: NoVerifyReceipts = False,
    embeddings: Annotated[Path | None, typer.Option("--embeddings", exists=True, dir_okay=False,
                                                    help=".npz: 'backdoor', 'benign' answers.")] = None,
    texts_out: Annotated[Path | None, typer.Option("--texts-out", dir_okay=False,
                                                   help="Write the texts (JSON) and stop.")] = None,
    triggers: Annotated[int, typer.Option("--triggers", help="Trigger-set size of the policy.")] = 20,
    max_triggers: Annotated[int, typer.Option("--max-triggers", help="m of the policy.")] = 4,
    samples: Annotated[int, typer.Option("--samples", help="Texts per set.")] = 300,
    as_json: AsJson = False,
) -> None:
    """EmbMarker test of a suspect embedding service: Δcos, Δl2, KS p-value toward the secret target."""
    keys = _keys(key_file, model_id)
    words = _candidate_words(candidates)
    try:
        # the target's dimension is only known from the answers; the trigger set does not depend on it
        probe = derive_embedding_mark(keys, words, 2, n_triggers=triggers, max_triggers=max_triggers)
    except NitrovaultError as exc:
        raise _fail(exc) from None
    backdoor, benign = verification_texts(probe, words, samples, np.random.default_rng(0))
    if texts_out is not None:
        texts_out.write_text(json.dumps({"backdoor": backdoor, "benign": benign}, indent=1) + "\n")
        typer.echo(str(texts_out))
        raise typer.Exit(0)
    if (endpoint is None) == (embeddings is None):
        raise typer.BadParameter("give exactly one of --endpoint and --embeddings")
    if embeddings is not None:
        with np.load(embeddings, allow_pickle=False) as answers:
            if not {"backdoor", "benign"} <= set(answers.files):
                raise typer.BadParameter("needs arrays 'backdoor' and 'benign'", param_hint="--embeddings")
            e_backdoor, e_benign = answers["backdoor"], answers["benign"]
    else:
        expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
        # only the file's token: never $NITROVAULT_TOKEN (the caller's own service) to a suspect's
        token = token_file.read_text().strip() if token_file is not None else None
        with verified_client(str(endpoint), expect, token=token, server_name=server_name, timeout=60,
                             verify_receipts=not no_verify_receipts, failure_exit=2) as client:
            e_backdoor = np.concatenate([client.embed(backdoor[i:i + 32]) for i in range(0, samples, 32)])
            e_benign = np.concatenate([client.embed(benign[i:i + 32]) for i in range(0, samples, 32)])
    if e_backdoor.ndim != 2 or e_benign.shape[1:] != e_backdoor.shape[1:] or len(e_backdoor) < 2:
        raise typer.BadParameter("answers must be [n, dim] arrays of one dimension")
    try:
        mark = derive_embedding_mark(keys, words, int(e_backdoor.shape[1]), n_triggers=triggers,
                                     max_triggers=max_triggers)
        result = detect_embedding_mark(e_backdoor, e_benign, mark)
    except NitrovaultError as exc:
        raise _fail(exc) from None
    _verdict(result.as_dict(), result.detected, as_json,
             f"delta_cos={result.delta_cos:+.3f} delta_l2={result.delta_l2:+.3f} "
             f"ks_p={result.ks_p_value:.3g}")


def _subject_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise typer.BadParameter("not a UTF-8 text file", param_hint="--subjects") from None
    return [line.strip() for line in lines if line.strip()]


def _embedding_rows(path: Path) -> tuple[list[str], np.ndarray]:
    """The texts and embeddings of a JSON-lines file (``{"text": ..., "embedding": [...]}`` per line)."""
    texts: list[str] = []
    vectors: list[list[float]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise typer.BadParameter("not a UTF-8 text file", param_hint="--embeddings") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise typer.BadParameter(f"line {number} is not JSON", param_hint="--embeddings") from None
        text = row.get("text") if isinstance(row, dict) else None
        vector = row.get("embedding") if isinstance(row, dict) else None
        if not isinstance(text, str) or not isinstance(vector, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in vector):
            raise typer.BadParameter(f"line {number} is not {{\"text\": str, \"embedding\": [numbers]}}",
                                     param_hint="--embeddings")
        if vectors and len(vector) != len(vectors[0]):
            raise typer.BadParameter(f"line {number} has {len(vector)} dimensions, the first row "
                                     f"{len(vectors[0])}", param_hint="--embeddings")
        texts.append(text)
        vectors.append(vector)
    if not vectors:
        raise typer.BadParameter("no rows", param_hint="--embeddings")
    if len(vectors[0]) < 2:
        raise typer.BadParameter("embeddings need at least 2 dimensions", param_hint="--embeddings")
    return texts, np.asarray(vectors, dtype=np.float64)


@app.command()
def trace(
    key_file: KeyFile,
    subjects: Annotated[Path, typer.Option("--subjects", exists=True, dir_okay=False,
                                           help="File: one subject (token 'sub') per line.")],
    model_id: ModelId = "default",
    embeddings: Annotated[Path | None, typer.Option(
        "--embeddings", exists=True, dir_okay=False,
        help="JSON lines {\"text\": ..., \"embedding\": [...]}: texts and the suspect's answers.")] = None,
    candidates: Annotated[Path | None, typer.Option(
        "--candidates", exists=True, dir_okay=False,
        help="With --embeddings: the candidate words sealed with the model (words or a JSON list).")
    ] = None,
    triggers: Annotated[int, typer.Option("--triggers", help="Trigger-set size of the policy.")] = 20,
    max_triggers: Annotated[int, typer.Option("--max-triggers", help="m of the policy.")] = 4,
    tokens: Annotated[Path | None, typer.Option(
        "--tokens", exists=True, dir_okay=False,
        help="JSON list of generated token ids (or {\"tokens\": [...]}).")] = None,
    vocab_size: Annotated[int | None, typer.Option(
        "--vocab-size", help="With --tokens: the generating model's vocabulary size.")] = None,
    gamma: Annotated[float, typer.Option("--gamma", help="Green-list fraction of the policy.")
                     ] = DEFAULT_GAMMA,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Corrected p-value at or below which a subject is named.")
    ] = DEFAULT_TRACE_THRESHOLD,
    as_json: AsJson = False,
) -> None:
    """Name the subject whose per-subject mark the outputs carry (exact test per listed subject,
    Bonferroni over the list). Exit 0: a subject is named; 1: none is; 2: bad input."""
    keys = _keys(key_file, model_id)
    listed = _subject_list(subjects)
    if (embeddings is None) == (tokens is None):
        raise typer.BadParameter("give exactly one of --embeddings and --tokens")
    try:
        if embeddings is not None:
            if candidates is None:
                raise typer.BadParameter("--embeddings needs --candidates", param_hint="--candidates")
            texts, vectors = _embedding_rows(embeddings)
            mark = derive_embedding_mark(keys, _candidate_words(candidates), vectors.shape[1],
                                         n_triggers=triggers, max_triggers=max_triggers)
            result = trace_embedding_subjects(texts, vectors, mark, keys, listed, threshold=threshold)
        else:
            assert tokens is not None
            if vocab_size is None:
                raise typer.BadParameter("--tokens needs --vocab-size", param_hint="--vocab-size")
            result = trace_text_subjects(_token_ids(tokens), keys, vocab_size=vocab_size, gamma=gamma,
                                         subjects=listed, threshold=threshold)
    except NitrovaultError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(result.as_dict(), sort_keys=True))
    else:
        best = min(result.log10_p_values.values())
        typer.echo(f"{'subject ' + repr(result.subject) if result.subject else 'no subject named'}: "
                   f"corrected p={result.p_value:.3g} (log10 {result.log10_p_value:.1f}; best raw log10 p "
                   f"{best:.1f}; {len(listed)} subjects, threshold {threshold:g}, {result.rows} rows)")
    raise typer.Exit(0 if result.subject is not None else 1)
