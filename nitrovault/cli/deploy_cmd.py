"""``nitrovault deploy enclave-config``: the measured enclave config from the deployed stack's outputs.

The enclave config is baked into the image (PCR0/PCR2), and it names the model key's ARN, so the key must
exist before the image is built, while the key policy needs the image's PCRs. The first deploy breaks the
circle in two phases (``docs/deploy.md``, "First deploy"): ``cdk deploy -c firstDeploy=true`` creates the
key with no release statement (nothing can decrypt), this command writes ``enclave.json`` from that
deploy's ``--outputs-file``, the image is built from it, and a second deploy adds the image's PCRs::

    cdk deploy Nitrovault -c firstDeploy=true ... --outputs-file cdk-outputs.json
    nitrovault seal model.safetensors --key-id alias/nitrovault/resnet ... -o model.sealed
    nitrovault deploy enclave-config --outputs cdk-outputs.json --config enclave.base.json \\
        --sealed-model model.sealed -o enclave.json [--stack Nitrovault] [--state-store-ca ca.pem]
    scripts/build_enclave.sh --config enclave.json --sealed-model model.sealed ...

``--config`` is the owner's part of the config (handler, access, protection, limits, ...); the command
fills in what the deployment decides and checks, in order (a failure names its step):

1. **outputs**: the file is the CDK CLI's ``--outputs-file`` JSON (stack name -> output name -> value)
   and holds ``--stack``.
2. **key**: ``ModelKeyArn`` is a full KMS key ARN (never an alias, which whoever controls aliases could
   move); the region is the ARN's.
3. **model**: ``ModelId`` and ``ModelVersion`` are there; the encryption context is
   ``{"model": ModelId, "version": ModelVersion}``, as the stack's key policy demands.
4. **config**: what ``--config`` already says about these fields agrees with the outputs (a config written
   for another deployment or model is refused, not overwritten).
5. **state store**: the stack's ``StateStoreEndpointAddress`` (a bare host name) becomes
   ``state_store.host``, with ``--state-store-ca`` (default: the config's own, else Amazon's roots) as its
   CA bundle; a config naming a state store for a stack without one is refused.
6. **sealed model**: its header names the stack's key ARN and the model's encryption context exactly,
   and its digest becomes ``sealed_digest`` (the config may already pin that digest, no other).
7. **enclave loader**: the result loads as :class:`enclave_app.config.EnclaveConfig` (the enclave's own
   loader; ``kms_ca_bundle`` defaults to Amazon's roots), and is written in its canonical form (sorted
   keys: the same inputs give the same bytes, hence the same PCR2).

Exit codes: 0 written, 1 a step failed, 2 an input is unreadable (missing file, not JSON, not a sealed
model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from enclave_app.config import EnclaveConfig
from nitrovault.envelope import SealedHeader, SealedModel
from nitrovault.errors import ConfigError, NitrovaultError
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.state.store import HOST_NAME

__all__ = [
    "DEFAULT_STACK",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREADABLE",
    "OUTPUT_KEY_ARN",
    "OUTPUT_MODEL_ID",
    "OUTPUT_MODEL_VERSION",
    "OUTPUT_STATE_STORE",
    "app",
    "enclave_config",
    "enclave_config_from_outputs",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2

#: the CDK app's stack (``infra.app.STACK_NAME``; a test keeps them equal)
DEFAULT_STACK = "Nitrovault"
#: the stack outputs this command reads (``infra/stacks/nitrovault_stack.py``; a test keeps them there)
OUTPUT_KEY_ARN = "ModelKeyArn"
OUTPUT_MODEL_ID = "ModelId"
OUTPUT_MODEL_VERSION = "ModelVersion"
OUTPUT_STATE_STORE = "StateStoreEndpointAddress"
_RELEASE_SETS = "ModelKeyReleaseSets"

_KEY_ARN = re.compile(r"arn:aws[a-z-]*:kms:([a-z]{2}(?:-[a-z]+)+-\d{1,2}):(\d{12}):key/([A-Za-z0-9-]{1,64})")

app = typer.Typer(no_args_is_help=True, help="Deploy helpers: the measured enclave config from the stack.")


def _step(number: int, name: str, message: str) -> ConfigError:
    return ConfigError(f"step {number} ({name}): {message}")


def _stack_outputs(outputs: Mapping[str, Any], stack: str) -> dict[str, str]:
    """Step 1: the ``--outputs-file`` JSON holds ``stack``, whose outputs are strings."""
    if not isinstance(outputs, Mapping) or not all(isinstance(v, Mapping) for v in outputs.values()):
        raise _step(1, "outputs", "not a `cdk deploy --outputs-file` JSON (stack name -> outputs)")
    if stack not in outputs:
        found = ", ".join(sorted(outputs)) or "none"
        raise _step(1, "outputs", f"no outputs of stack {stack!r} (stacks in the file: {found})")
    values = outputs[stack]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise _step(1, "outputs", f"the outputs of {stack!r} must be strings")
    return dict(values)


def _agree(base: Mapping[str, Any], name: str, value: object) -> None:
    """Step 4: the owner's config may already name ``name``, but only as ``value``."""
    if name in base and base[name] != value:
        raise _step(
            4, "config",
            f"the config's {name} is {base[name]!r} but the stack's is {value!r}: a config for another "
            "deployment or model (remove the field to take the stack's)",
        )


def _state_store(
    base: Mapping[str, Any], host: str | None, ca_pem: str | None
) -> dict[str, Any] | None:
    """Step 5: ``state_store`` from the stack's endpoint (None: the stack has no store)."""
    section = base.get("state_store")
    if host is None:
        if section is not None:
            raise _step(
                5, "state store",
                f"the config names a state store but the stack has no {OUTPUT_STATE_STORE} output "
                "(deployed with -c stateStore=false?): remove state_store or deploy the store",
            )
        if ca_pem is not None:
            raise _step(5, "state store", "--state-store-ca given but the stack has no state store")
        return None
    if not HOST_NAME.fullmatch(host):
        raise _step(5, "state store", f"{OUTPUT_STATE_STORE} must be a bare host name, not {host!r}")
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise _step(5, "state store", "the config's state_store must be an object")
    if section.get("host", host) != host:
        raise _step(
            5, "state store",
            f"the config's state_store.host is {section['host']!r} but the stack's store is {host!r}",
        )
    store = {**section, "host": host}
    if ca_pem is not None:
        store["ca_bundle"] = ca_pem
    store.setdefault("ca_bundle", amazon_trust_services_pem())
    return store


def enclave_config_from_outputs(
    outputs: Mapping[str, Any],
    base: Mapping[str, Any],
    header: SealedHeader,
    *,
    stack: str = DEFAULT_STACK,
    state_store_ca: str | None = None,
) -> EnclaveConfig:
    """Steps 1-7 of the module docstring (pure): ``outputs`` is the parsed ``--outputs-file``, ``base`` the
    owner's config, ``header`` the sealed model's. :class:`ConfigError` naming the failed step."""
    values = _stack_outputs(outputs, stack)
    # 2. the key: a full ARN (the enclave decrypts with exactly this KeyId), the region is its own
    key_arn = values.get(OUTPUT_KEY_ARN, "")
    match = _KEY_ARN.fullmatch(key_arn)
    if match is None:
        what = "an alias" if ":alias/" in key_arn else repr(key_arn) if key_arn else "missing"
        raise _step(2, "key", f"{OUTPUT_KEY_ARN} must be a full KMS key ARN (...:key/ID), not {what}")
    region = match.group(1)
    # 3. the model and its encryption context (the key policy's kms:EncryptionContext conditions)
    model_id, version = values.get(OUTPUT_MODEL_ID), values.get(OUTPUT_MODEL_VERSION)
    if not model_id or not version:
        missing = [n for n, v in ((OUTPUT_MODEL_ID, model_id), (OUTPUT_MODEL_VERSION, version)) if not v]
        raise _step(3, "model", f"the stack has no {' and '.join(missing)} output (an older stack? redeploy)")
    context = {"model": model_id, "version": version}
    # 4. the owner's config must not contradict the deployment
    if not isinstance(base, Mapping):
        raise _step(4, "config", "the config must be a JSON object")
    for name, value in (("model_id", model_id), ("model_version", version), ("kms_key_arn", key_arn),
                        ("region", region), ("encryption_context", context)):
        _agree(base, name, value)
    config: dict[str, Any] = {**base, "model_id": model_id, "model_version": version,
                              "kms_key_arn": key_arn, "region": region, "encryption_context": context}
    # 5. the shared state store's endpoint (measured: it decides who the enclave believes is the store)
    store = _state_store(base, values.get(OUTPUT_STATE_STORE), state_store_ca)
    if store is not None:
        config["state_store"] = store
    # 6. the sealed model: sealed under this key, for this model; its digest is what the image serves
    if header.key_id != key_arn:
        raise _step(
            6, "sealed model",
            f"the sealed model's key is {header.key_id!r}, not the stack's {key_arn!r}: seal it with "
            f"--key-id {key_arn} (or the stack's alias) through KMS",
        )
    if dict(header.encryption_context) != context:
        raise _step(
            6, "sealed model",
            f"the sealed model's encryption context is {dict(header.encryption_context)!r}, not the "
            f"stack's {context!r}: the key policy would refuse it",
        )
    digest = header.digest.hex()
    if base.get("sealed_digest") not in (None, "", digest):
        raise _step(6, "sealed model", f"the config pins sealed_digest {base['sealed_digest']}, "
                                       f"the sealed model's is {digest}")
    config["sealed_digest"] = digest
    # 7. the enclave's own loader decides whether the image would boot with it
    config.setdefault("kms_ca_bundle", amazon_trust_services_pem())
    try:
        return EnclaveConfig.from_mapping(config)
    except ConfigError as exc:
        raise _step(7, "enclave loader", str(exc)) from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON") from None


@app.command("enclave-config")
def enclave_config(
    outputs_path: Annotated[
        Path, typer.Option("--outputs", help="the JSON `cdk deploy --outputs-file FILE` wrote")
    ],
    config_path: Annotated[
        Path, typer.Option("--config", help="the owner's enclave config (handler, access, protection, ...)")
    ],
    sealed_path: Annotated[
        Path, typer.Option("--sealed-model", help="the sealed model the image will serve")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write enclave.json")],
    stack: Annotated[str, typer.Option("--stack", help="the stack whose outputs to read")] = DEFAULT_STACK,
    state_store_ca: Annotated[
        Path | None, typer.Option("--state-store-ca", help="PEM CAs for the state store (default Amazon's)")
    ] = None,
) -> None:
    """Write the measured enclave.json from the stack's outputs; validated by the enclave's own loader."""
    try:
        outputs = _read_json(outputs_path, "outputs file")
        base = _read_json(config_path, "enclave config")
        header = SealedModel.open(sealed_path).header
        ca_pem = state_store_ca.read_text() if state_store_ca is not None else None
    except OSError as exc:
        typer.echo(f"error: cannot read {exc.filename}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_UNREADABLE) from None
    except NitrovaultError as exc:
        typer.echo(f"error: {exc.diagnostics()}", err=True)
        raise typer.Exit(EXIT_UNREADABLE) from None
    try:
        config = enclave_config_from_outputs(outputs, base, header, stack=stack, state_store_ca=ca_pem)
    except ConfigError as exc:
        typer.echo(f"error: {exc.diagnostics()}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    output.write_text(config.to_json())
    sets = _stack_outputs(outputs, stack).get(_RELEASE_SETS, "?")
    store = config.state_store.host if config.state_store is not None else "none"
    typer.echo(
        f"enclave config: {output}\n  key {config.kms_key_arn} ({config.region})\n"
        f"  model {config.model_id} v{config.model_version}, sealed_digest {config.sealed_digest}\n"
        f"  state store {store}\n  the key is released to {sets} measurement set(s) now\n"
        f"next: scripts/build_enclave.sh --config {output} --sealed-model {sealed_path} ...",
        err=True,
    )
