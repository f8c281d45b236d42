"""``nitrovault embed``, ``infer`` and ``generate``: call a serving enclave with :mod:`nitrovault.client`;
and the trust options every verb that talks to an enclave shares (``attest fetch``, ``attest pin``,
``watermark detect-embeddings --endpoint``), parsed here once (:func:`build_expect`, :func:`verified_client`).

Nothing is sent before the enclave is verified: TLS 1.3 to the target, its certificate pinned, ``Attest``
with a fresh nonce checked against the trust root and the expected PCRs, and the attested TLS key compared
with the connection's (:mod:`nitrovault.client`). Only then does the token travel, and every response's
receipt is checked before it is printed. The trust options:

``--expect-pcr N=HEX`` (repeatable) and/or ``--pcr-manifest FILE`` (the image build's ``pcr-manifest.json``)
    the measurements the enclave must have; PCR0 is required, and the two may not contradict each other.
``--root PEM``
    the attestation trust root (default: the pinned AWS Nitro Enclaves Root G1).
``--ca-file PEM``
    only when the enclave's certificate is issued by the owner's CA: its chain must then validate to it.
``--server-name NAME``
    the TLS name to ask for (default: the DNS name in the enclave's certificate).
``--no-verify-receipts``
    do not check the responses' receipts (warns on every use).

Exit codes: 0 ok; 1 the enclave failed verification or the call failed, one line ``error: <step>: <message>``
on stderr (``tls``, ``root``, ``chain``, ``signature``, ``pcr``, ``nonce``, ``freshness``, ``tls-binding``,
``receipt: <reason>``, or the gRPC status name such as ``UNAVAILABLE``); 2 usage error (bad option, unreadable
file, no PCR0, an input numpy cannot send). The bearer token comes from ``--token-file`` or the
``NITROVAULT_TOKEN`` environment variable, never from a flag: a secret on a command line is visible to
every user of the machine (``ps``) and lands in shell history. No message ever contains it.

    nitrovault embed "A man is eating food." "A man is eating bread." --similarity \\
        --target models.example.com:443 --pcr-manifest build/pcr-manifest.json --token-file ~/.nv-token
    nitrovault infer --input x=batch.npy -o out.npz --target 127.0.0.1:50051 --expect-pcr 0=e72a46... \\
        --root local/pki/root.pem
    nitrovault embed "text" --pcr-manifest m.json --save-receipt receipt.cbor --save-response response.bin \\
        --save-request request.bin

``--save-receipt`` writes the response's receipt (deterministic CBOR ``[payload, signature]``),
``--save-response`` the exact bytes it covers (the response serialized deterministically with its receipt
field cleared) and ``--save-request`` the request message exactly as sent (the receipt's ``req`` hash):
with an attestation document from ``nitrovault attest fetch`` they verify offline with
``nitrovault receipt verify --response FILE --request FILE``.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from nitrovault.attestation import load_root, parse_pcr_arg
from nitrovault.client import Expect, NitrovaultClient, Receipted
from nitrovault.errors import (
    AttestationError,
    BindingError,
    ClientError,
    ConfigError,
    NitrovaultError,
    ReceiptError,
    TlsIdentityError,
)
from nitrovault.identity import load_certificates
from nitrovault.policy.manifest import load_manifest
from nitrovault.rpc.tensors import TensorFormatError

TOKEN_ENV = "NITROVAULT_TOKEN"  # noqa: S105 - the name of the variable, not a secret
#: leading dimensions shown per embedding in the text output
SHOWN_DIMS = 4
#: what a failed verification or call raises out of a client (mapped to one ``error:`` line)
FAILURES = (AttestationError, BindingError, TlsIdentityError, ReceiptError, ClientError)

Target = Annotated[str, typer.Option("--target", help="gRPC address: host:port or unix:/path.")]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", help=f"File holding the bearer token (else ${TOKEN_ENV}).", dir_okay=False),
]
Timeout = Annotated[float, typer.Option("--timeout", help="Deadline of each call, in seconds.", min=0.001)]

# -- the trust options (module docstring) -------------------------------------------------------------

ExpectPcr = Annotated[list[str] | None, typer.Option(
    "--expect-pcr", metavar="N=HEX", help="A PCR the enclave must have (96 hex digits); repeatable. "
                                          "PCR0 is required (here or in --pcr-manifest).")]
PcrManifest = Annotated[Path | None, typer.Option(
    "--pcr-manifest", dir_okay=False, help="The image build's pcr-manifest.json: the PCRs to expect.")]
Root = Annotated[Path | None, typer.Option(
    "--root", dir_okay=False, help="Attestation trust root PEM (default: pinned AWS Nitro Root G1).")]
CaFile = Annotated[Path | None, typer.Option(
    "--ca-file", dir_okay=False,
    help="The owner's CA (PEM), only when the enclave's certificate is CA-issued: its chain must validate.")]
ServerName = Annotated[str | None, typer.Option(
    "--server-name", help="TLS name to ask for (default: the DNS name in the enclave's certificate).")]
NoVerifyReceipts = Annotated[bool, typer.Option(
    "--no-verify-receipts", help="UNSAFE: do not check the responses' signed receipts.")]


def build_expect(expect_pcr: list[str] | None, pcr_manifest: Path | None, root: Path | None,
                 ca_file: Path | None) -> Expect:
    """The :class:`Expect` of the trust options; a usage error (exit 2) for anything unusable."""
    pcrs: dict[int, bytes] = {}
    if pcr_manifest is not None:
        try:
            pcrs.update(load_manifest(pcr_manifest).pcrs)
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="--pcr-manifest") from None
    for arg in expect_pcr or []:
        try:
            index, value = parse_pcr_arg(arg)
        except ConfigError as err:
            raise typer.BadParameter(str(err), param_hint="--expect-pcr") from None
        if pcrs.setdefault(index, value) != value:
            raise typer.BadParameter(f"PCR{index} is given twice with different values",
                                     param_hint="--expect-pcr") from None
    if 0 not in pcrs:
        raise typer.BadParameter(
            "expect at least PCR0, the enclave image (--expect-pcr 0=HEX or --pcr-manifest FILE): "
            "without it nothing about the server is proven", param_hint="--expect-pcr")
    try:
        trust_root = None if root is None else load_root(root)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--root") from None
    ca = None
    if ca_file is not None:
        try:
            ca = ca_file.read_bytes()
            load_certificates(ca)
        except OSError as err:
            raise typer.BadParameter(f"cannot read: {err.strerror}", param_hint="--ca-file") from None
        except TlsIdentityError as err:
            raise typer.BadParameter(str(err), param_hint="--ca-file") from None
    try:
        return Expect(pcrs=pcrs, root=trust_root, ca=ca)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--expect-pcr") from None


def failure_line(err: NitrovaultError) -> str:
    """``<step>: <message>`` of a verification or call failure (never secret material)."""
    if isinstance(err, ClientError):
        return str(err)  # "CODE: details"
    if isinstance(err, ReceiptError):
        return f"{err.step}: {err.reason}: {err}"
    return f"{err.step}: {err}"


@contextmanager
def verified_client(target: str, expect: Expect, *, token: str | None, server_name: str | None,
                    timeout: float, verify_receipts: bool = True,
                    failure_exit: int = 1) -> Iterator[NitrovaultClient]:
    """A client that verifies ``target`` before it sends; a failure inside the ``with`` block prints one
    ``error:`` line and exits ``failure_exit``."""
    if not verify_receipts:
        typer.secho("WARNING: --no-verify-receipts: responses are not checked against the enclave's "
                    "signed receipts.", fg=typer.colors.RED, err=True)
    try:
        client = NitrovaultClient(target, expect=expect, token=token, server_name=server_name,
                                  timeout=timeout, verify_receipts=verify_receipts)
    except ConfigError as err:  # a token that cannot travel as metadata; the message never echoes it
        raise typer.BadParameter(str(err), param_hint="--token-file") from None
    try:
        yield client
    except FAILURES as err:
        typer.echo(f"error: {failure_line(err)}", err=True)
        raise typer.Exit(failure_exit) from None
    finally:
        client.close()


def read_token(token_file: Path | None) -> str | None:
    """The bearer token of ``--token-file``, else of ``$NITROVAULT_TOKEN``, else None."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise typer.BadParameter("cannot read the token file", param_hint="--token-file") from None
        if not token:
            raise typer.BadParameter("the token file is empty", param_hint="--token-file")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


# -- the verbs -------------------------------------------------------------------------------------------

SaveReceipt = Annotated[Path | None, typer.Option(
    "--save-receipt", dir_okay=False, help="Write the response's signed receipt (CBOR) here.")]
SaveResponse = Annotated[Path | None, typer.Option(
    "--save-response", dir_okay=False, help="Write the response bytes the receipt covers here.")]
SaveRequest = Annotated[Path | None, typer.Option(
    "--save-request", dir_okay=False, help="Write the request bytes the receipt covers here.")]


def _save(receipted: Receipted, receipt: Path | None, response: Path | None, request: Path | None) -> None:
    if (receipt or response or request) and not receipted.receipt:
        typer.echo("error: receipt: the enclave sent no receipt", err=True)
        raise typer.Exit(1)
    for path, data in ((receipt, receipted.receipt), (response, receipted.response),
                       (request, receipted.request)):
        if path is not None:
            try:
                path.write_bytes(data)
            except OSError as err:
                raise typer.BadParameter(f"cannot write {path}: {err.strerror}") from None


def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.", show_default=False)],
    target: Target = "127.0.0.1:50051",
    token_file: TokenFile = None,
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    no_verify_receipts: NoVerifyReceipts = False,
    normalize: Annotated[
        bool, typer.Option("--normalize/--no-normalize", help="L2-normalize vectors.")
    ] = True,
    similarity: Annotated[
        bool, typer.Option("--similarity", help="Also print the cosine similarity matrix (2+ texts).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the full vectors.")
    ] = False,
    timeout: Timeout = 30.0,
    save_receipt: SaveReceipt = None,
    save_response: SaveResponse = None,
    save_request: SaveRequest = None,
) -> None:
    """Embed texts inside the verified enclave; print each vector's first dimensions and norm."""
    expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
    with verified_client(target, expect, token=read_token(token_file), server_name=server_name,
                         timeout=timeout, verify_receipts=not no_verify_receipts) as client:
        vectors, receipted = client.embed_with_receipt(texts, normalize=normalize)
    _save(receipted, save_receipt, save_response, save_request)
    norms = np.linalg.norm(vectors, axis=1)
    cosine = _cosine(vectors, norms) if similarity and len(texts) >= 2 else None
    if as_json:
        out: dict[str, object] = {
            "texts": texts,
            "dim": int(vectors.shape[1]),
            "norms": [float(n) for n in norms],
            "embeddings": vectors.tolist(),
        }
        if cosine is not None:
            out["similarity"] = cosine.tolist()
        typer.echo(json.dumps(out))
        return
    for i, (text, vector, norm) in enumerate(zip(texts, vectors, norms, strict=True)):
        head = ", ".join(f"{v:+.4f}" for v in vector[:SHOWN_DIMS])
        more = ", …" if vector.shape[0] > SHOWN_DIMS else ""
        typer.echo(f"[{i}] dim={vector.shape[0]} norm={norm:.4f} [{head}{more}]  {text}")
    if cosine is not None:
        typer.echo("cosine similarity:")
        typer.echo("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(texts))))
        for i, row in enumerate(cosine):
            typer.echo(f"{f'[{i}]':<5}" + "".join(f"{v:>8.3f}" for v in row))


def _cosine(vectors: np.ndarray, norms: np.ndarray) -> np.ndarray:
    unit = vectors / np.where(norms == 0, 1.0, norms)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _load_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise typer.BadParameter(f"expected NAME=FILE.npy, got {spec!r}", param_hint="--input")
        if name in inputs:
            raise typer.BadParameter(f"input {name!r} given twice", param_hint="--input")
        try:
            # allow_pickle=False: a .npy from elsewhere must not run code on load.
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise typer.BadParameter(f"cannot load {file}: {err}", param_hint="--input") from None
        if not isinstance(array, np.ndarray):
            raise typer.BadParameter(f"{file} is not a single .npy array", param_hint="--input")
        inputs[name] = array
    return inputs


def infer(
    inputs: Annotated[
        list[str],
        typer.Option("--input", "-i", help="NAME=FILE.npy, once per model input.", show_default=False),
    ],
    target: Target = "127.0.0.1:50051",
    token_file: TokenFile = None,
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    no_verify_receipts: NoVerifyReceipts = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the outputs to this .npz.", dir_okay=False)
    ] = None,
    timeout: Timeout = 30.0,
    save_receipt: SaveReceipt = None,
    save_response: SaveResponse = None,
    save_request: SaveRequest = None,
) -> None:
    """Run the model in the verified enclave on .npy inputs; print each output's name, shape and dtype."""
    arrays = _load_inputs(inputs)
    expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
    with verified_client(target, expect, token=read_token(token_file), server_name=server_name,
                         timeout=timeout, verify_receipts=not no_verify_receipts) as client:
        try:
            outputs, receipted = client.infer_with_receipt(arrays)
        except TensorFormatError as err:
            raise typer.BadParameter(str(err), param_hint="--input") from None
    _save(receipted, save_receipt, save_response, save_request)
    width = max((len(name) for name in outputs), default=0)
    for name, array in outputs.items():
        typer.echo(f"{name:<{width}}  shape={list(array.shape)}  dtype={array.dtype}")
    if output is not None:
        _write_npz(output, outputs)
        typer.echo(f"wrote {output}")


def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue.", show_default=False)],
    target: Target = "127.0.0.1:50051",
    token_file: TokenFile = None,
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    no_verify_receipts: NoVerifyReceipts = False,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", "-n", min=0, help="Most tokens to generate (0: the enclave's limit).")] = 0,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", "-t", help="0: greedy; default 1; at most 5.")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1].")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", help="Repeatable (up to 4): end the text before this sequence.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Reproducible sampling.")] = None,
    timeout: Timeout = 120.0,
    save_receipt: SaveReceipt = None,
    save_response: Annotated[Path | None, typer.Option(
        "--save-response", dir_okay=False,
        help="Write the stream's transcript (what the receipt covers) here.")] = None,
    save_request: SaveRequest = None,
) -> None:
    """Continue a prompt in the verified enclave, printing the text as it arrives; a summary line (why it
    ended, tokens, receipt) goes to stderr."""
    expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
    with verified_client(target, expect, token=read_token(token_file), server_name=server_name,
                         timeout=timeout, verify_receipts=not no_verify_receipts) as client:
        with client.generate_stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, stop=stop or (), seed=seed, timeout=timeout) as stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = stream.result
        assert result is not None  # the stream raises unless its last message arrived
    sys.stdout.write("\n")
    _save(result.receipted, save_receipt, save_response, save_request)
    checked = "not checked" if no_verify_receipts else "verified"
    typer.echo(f"[{result.finish_reason}: {result.prompt_tokens} prompt + {result.completion_tokens} "
               f"generated tokens; {result.model_id}; receipt {checked}]", err=True)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, by hand: ``savez(**arrays)`` would take an output the model named
    ``allow_pickle`` or ``file`` for its own keyword argument."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
