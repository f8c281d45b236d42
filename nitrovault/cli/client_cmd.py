"""``nitrovault embed`` and ``nitrovault infer``: call a serving enclave with :mod:`nitrovault.client`.

Exit codes: 0 ok, 1 the call failed (one line ``error: CODE: details`` on stderr), 2 usage error (bad
option, unreadable file, an input numpy cannot send). The bearer token comes from ``--token-file`` or the
``NITROVAULT_TOKEN`` environment variable, never from a flag: a secret on a command line is visible to
every user of the machine (``ps``) and lands in shell history.

    nitrovault embed "A man is eating food." "A man is eating bread." --similarity
    nitrovault infer --input x=batch.npy -o out.npz --target 127.0.0.1:50051 --token-file ~/.nv-token
    nitrovault embed "text" --token-file t --save-receipt receipt.cbor --save-response response.bin

``--save-receipt`` writes the response's receipt (deterministic CBOR ``[payload, signature]``) and
``--save-response`` the exact bytes it covers (the response serialized deterministically with its receipt
field cleared): with an attestation document from ``nitrovault attest fetch`` they verify offline with
``nitrovault receipt verify``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from nitrovault.client import NitrovaultClient
from nitrovault.errors import ClientError, ConfigError
from nitrovault.rpc.tensors import TensorFormatError

TOKEN_ENV = "NITROVAULT_TOKEN"  # noqa: S105 - the name of the variable, not a secret
#: leading dimensions shown per embedding in the text output
SHOWN_DIMS = 4

Target = Annotated[str, typer.Option("--target", help="gRPC address: host:port or unix:/path.")]
TokenFile = Annotated[
    Path | None,
    typer.Option("--token-file", help=f"File holding the bearer token (else ${TOKEN_ENV}).", dir_okay=False),
]
CaFile = Annotated[
    Path | None,
    typer.Option("--ca-file", help="PEM root certificates: use TLS and trust these.", dir_okay=False),
]
ServerName = Annotated[
    str | None, typer.Option("--server-name", help="TLS name to expect instead of the target's host.")
]
Timeout = Annotated[float, typer.Option("--timeout", help="Deadline of each call, in seconds.", min=0.001)]


def _token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise typer.BadParameter("cannot read the token file", param_hint="--token-file") from None
        if not token:
            raise typer.BadParameter("the token file is empty", param_hint="--token-file")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


@contextmanager
def _client(
    target: str, token_file: Path | None, ca_file: Path | None, server_name: str | None, timeout: float
) -> Iterator[NitrovaultClient]:
    token = _token(token_file)
    roots = None
    if ca_file is not None:
        try:
            roots = ca_file.read_bytes()
        except OSError as err:
            raise typer.BadParameter(f"cannot read: {err.strerror}", param_hint="--ca-file") from None
    if server_name is not None and roots is None:
        raise typer.BadParameter("--server-name needs --ca-file (it only applies to TLS)")
    try:
        client = NitrovaultClient(
            target, token=token, root_certificates=roots, server_name=server_name, timeout=timeout
        )
    except ConfigError as err:  # a token that cannot travel as metadata; the message never echoes it
        raise typer.BadParameter(str(err), param_hint="--token-file") from None
    try:
        yield client
    except ClientError as err:
        typer.echo(f"error: {err.code}: {err.details}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.", show_default=False)],
    target: Target = "127.0.0.1:50051",
    token_file: TokenFile = None,
    normalize: Annotated[
        bool, typer.Option("--normalize/--no-normalize", help="L2-normalize vectors.")
    ] = True,
    similarity: Annotated[
        bool, typer.Option("--similarity", help="Also print the cosine similarity matrix (2+ texts).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with the full vectors.")
    ] = False,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    timeout: Timeout = 30.0,
    save_receipt: Annotated[Path | None, typer.Option(
        "--save-receipt", dir_okay=False, help="Write the response's signed receipt (CBOR) here.")] = None,
    save_response: Annotated[Path | None, typer.Option(
        "--save-response", dir_okay=False, help="Write the response bytes the receipt covers here.")] = None,
) -> None:
    """Embed texts inside the enclave; print each vector's first dimensions and norm."""
    with _client(target, token_file, ca_file, server_name, timeout) as client:
        vectors, receipted = client.embed_with_receipt(texts, normalize=normalize)
    if (save_receipt or save_response) and not receipted.receipt:
        typer.echo("error: the enclave sent no receipt", err=True)
        raise typer.Exit(1)
    for path, data in ((save_receipt, receipted.receipt), (save_response, receipted.response)):
        if path is not None:
            try:
                path.write_bytes(data)
            except OSError as err:
                raise typer.BadParameter(f"cannot write {path}: {err.strerror}") from None
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
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the outputs to this .npz.", dir_okay=False)
    ] = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    timeout: Timeout = 30.0,
) -> None:
    """Run the model on .npy inputs; print each output's name, shape and dtype."""
    arrays = _load_inputs(inputs)
    with _client(target, token_file, ca_file, server_name, timeout) as client:
        try:
            outputs = client.infer(arrays)
        except TensorFormatError as err:
            raise typer.BadParameter(str(err), param_hint="--input") from None
    width = max((len(name) for name in outputs), default=0)
    for name, array in outputs.items():
        typer.echo(f"{name:<{width}}  shape={list(array.shape)}  dtype={array.dtype}")
    if output is not None:
        _write_npz(output, outputs)
        typer.echo(f"wrote {output}")


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What ``np.savez`` writes, by hand: ``savez(**arrays)`` would take an output the model named
    ``allow_pickle`` or ``file`` for its own keyword argument."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
