#!/usr/bin/env python3
"""Complete a measured enclave config for the image build: pin the sealed model, add the KMS trust roots.

    scripts/enclave_config.py --config enclave.json --sealed-model model.sealed --output build/enclave.json \
        [--state-store-endpoint master.nv-state.abc123.use1.cache.amazonaws.com [--state-store-ca ca.pem]]

* ``sealed_digest`` is set to the sealed model's header digest (what ``nitrovault seal`` printed). A config
  that already names a different digest is refused: the image would serve nothing.
* ``kms_ca_bundle`` is set to Amazon Trust Services' roots (``nitrovault/data/amazon-trust-services.pem``)
  unless the config carries its own (the local stack's configs carry the KMS emulator's CA).
* ``--state-store-endpoint`` (the CDK output ``StateStoreEndpointAddress``: a bare host name) sets
  ``state_store.host``, and ``state_store.ca_bundle`` to ``--state-store-ca`` when given, else (unless the
  config carries one) to Amazon Trust Services' roots (ElastiCache's certificates chain to them); the
  other ``state_store`` keys of the config are kept. The store's password is never part of the config:
  it is sealed with the model (``nitrovault seal --state-store-password-file``).
* The result must load as an :class:`enclave_app.config.EnclaveConfig` (https KMS endpoint, CA bundle,
  digest, forwarder on), so the build fails here rather than at boot. Written with sorted keys, so the same
  inputs always give the same bytes (and the same PCR2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_app.config import EnclaveConfig  # noqa: E402
from nitrovault.envelope import SealedModel  # noqa: E402
from nitrovault.errors import NitrovaultError  # noqa: E402
from nitrovault.kms.trust import amazon_trust_services_pem  # noqa: E402
from nitrovault.state.store import HOST_NAME  # noqa: E402


def complete(config: dict[str, object], sealed_digest: str, *, store_endpoint: str | None = None,
             store_ca: str | None = None) -> EnclaveConfig:
    pinned = config.get("sealed_digest")
    if pinned and pinned != sealed_digest:
        raise SystemExit(f"error: the config pins sealed_digest {pinned}, "
                         f"the sealed model's is {sealed_digest}")
    config["sealed_digest"] = sealed_digest
    config.setdefault("kms_ca_bundle", amazon_trust_services_pem())
    if store_endpoint is not None:
        if not HOST_NAME.fullmatch(store_endpoint):
            raise SystemExit("error: --state-store-endpoint must be a bare host name, "
                             f"not {store_endpoint!r}")
        section = config.get("state_store") or {}
        if not isinstance(section, dict):
            raise SystemExit("error: the config's state_store must be an object")
        section["host"] = store_endpoint
        if store_ca is not None:
            section["ca_bundle"] = store_ca
        section.setdefault("ca_bundle", amazon_trust_services_pem())
        config["state_store"] = section
    elif store_ca is not None:
        raise SystemExit("error: --state-store-ca needs --state-store-endpoint")
    return EnclaveConfig.from_mapping(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--sealed-model", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--state-store-endpoint", help="the shared state store's host name")
    parser.add_argument("--state-store-ca", type=Path, help="PEM CAs for the store (default: Amazon's)")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.config.read_text())
        if not isinstance(data, dict):
            raise SystemExit("error: the enclave config must be a JSON object")
        digest = SealedModel.open(args.sealed_model).header.digest.hex()
        store_ca = args.state_store_ca.read_text() if args.state_store_ca is not None else None
        config = complete(data, digest, store_endpoint=args.state_store_endpoint, store_ca=store_ca)
    except (OSError, ValueError, NitrovaultError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    args.output.write_text(config.to_json())
    print(f"enclave config: sealed_digest {digest}, {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
