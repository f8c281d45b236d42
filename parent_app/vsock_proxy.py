"""Configuration for AWS's ``vsock-proxy``: the parent's only door from the enclave to KMS.

The enclave reaches KMS through ``vsock-proxy`` on the parent (vsock ``(3, 8000)``), a raw TCP relay;
TLS runs end to end from the enclave, so the parent cannot read or forge KMS answers (see
``docs/design.md``, "Trust decisions"). What the parent *can* decide is where the relay may go, and
this module keeps that as narrow as possible.

Invariants:

* The allowlist names exactly the region's KMS endpoint (and, only when asked, its FIPS twin) on port
  443, never a wildcard and never another service: a compromised enclave image, or anyone who gets
  to speak vsock, can use the proxy to reach that one host and nothing else.
* The region name is validated before it is put into a host name, so no input can smuggle another
  host, a port or YAML syntax into the allowlist.
* The shared state store (ElastiCache for Valkey) is the one other destination: its entry
  (:func:`store_allowlist_entry`) is an ElastiCache endpoint host name, ``[a-z0-9.-]`` labels ending
  in ``.cache.amazonaws.com`` (``.cache.amazonaws.com.cn`` in China), on a port 1..65535, validated the
  same way; its relay is a second ``vsock-proxy`` on vsock port :data:`STATE_STORE_VSOCK_PORT`
  (:func:`store_proxy_argv`), and :func:`kms_and_store_allowlist` renders the host's allowlist with the
  KMS entry and that one store entry. The enclave speaks TLS and authenticates to the store itself, so
  the relay, like the KMS one, only copies ciphertext.
* Commands are argv lists for systemd / ``subprocess`` (never a shell string).

Why hand-written YAML rather than a YAML library: the document is one fixed line per entry whose
only variable part has been validated against ``[a-z0-9-]``; emitting it directly keeps the output
byte-for-byte identical to the format in the vsock-proxy README and adds no dependency.

Example::

    >>> print(kms_allowlist("eu-west-1"), end="")
    allowlist:
    - {address: kms.eu-west-1.amazonaws.com, port: 443}
    >>> vsock_proxy_argv("cn-north-1")[:4]
    ['vsock-proxy', '8000', 'kms.cn-north-1.amazonaws.com.cn', '443']
    >>> print(kms_and_store_allowlist("eu-west-1", "master.nv.abc123.euw1.cache.amazonaws.com", 6379), end="")
    allowlist:
    - {address: kms.eu-west-1.amazonaws.com, port: 443}
    - {address: master.nv.abc123.euw1.cache.amazonaws.com, port: 6379}
"""

from __future__ import annotations

import re

from nitrovault.errors import ConfigError

#: KMS answers HTTPS on 443 only.
KMS_PORT = 443
#: vsock-proxy's default local port (``VSOCK_PROXY_PORT`` in aws-nitro-enclaves-cli).
DEFAULT_LOCAL_PORT = 8000
#: Where the AWS systemd unit ``nitro-enclaves-vsock-proxy.service`` reads its allowlist.
DEFAULT_CONFIG_PATH = "/etc/nitro_enclaves/vsock-proxy.yaml"
#: The enclave config's ``ports.state_store``: the vsock port of the state store's relay on the parent.
STATE_STORE_VSOCK_PORT = 8002
#: An ElastiCache endpoint host name (also a POSIX ERE: the boot script re-checks a value CloudFormation
#: filled in with ``grep -Eqx``); :func:`store_endpoint_host` adds the label rules on top.
STORE_HOST_PATTERN = r"[a-z0-9.-]+\.cache\.amazonaws\.com(\.cn)?"
_STORE_HOST_RE = re.compile(STORE_HOST_PATTERN)
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# Commercial (us-east-1, ap-southeast-5, il-central-1, ...), GovCloud (us-gov-west-1) and China
# (cn-north-1, cn-northwest-1). The isolated partitions (us-iso-*, us-isob-*, eusc-*) use other DNS
# suffixes that we have not verified, so they are rejected rather than guessed.
_REGION_RE = re.compile(r"(?:[a-z]{2}|us-gov)-[a-z]+-[1-9][0-9]?")
_UNSUPPORTED_PARTITION_RE = re.compile(r"(?:us-iso[a-z]*|eusc)-")


def _dns_suffix(region: str) -> str:
    if not isinstance(region, str):
        raise ConfigError("an AWS region name must be a string")
    if _UNSUPPORTED_PARTITION_RE.match(region):
        raise ConfigError(f"region {region!r} is in a partition nitrovault does not support")
    if not _REGION_RE.fullmatch(region):
        raise ConfigError(f"not an AWS region name: {region!r}")
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def kms_endpoint(region: str, *, fips: bool = False) -> str:
    """The KMS host name of ``region``: ``kms.<region>.amazonaws.com`` (``.com.cn`` in China).

    Raises :class:`ConfigError` for a malformed region, or ``fips=True`` in China (KMS has no FIPS
    endpoint there).
    """
    suffix = _dns_suffix(region)
    if fips:
        if region.startswith("cn-"):
            raise ConfigError(f"KMS has no FIPS endpoint in {region}")
        return f"kms-fips.{region}.{suffix}"
    return f"kms.{region}.{suffix}"


def kms_allowlist(region: str, *, include_fips: bool = False) -> str:
    """The vsock-proxy YAML allowlist for the region's KMS endpoint only (plus FIPS when asked)."""
    hosts = [kms_endpoint(region)]
    if include_fips:
        hosts.append(kms_endpoint(region, fips=True))
    lines = ["allowlist:"] + [f"- {{address: {host}, port: {KMS_PORT}}}" for host in hosts]
    return "\n".join(lines) + "\n"


def vsock_proxy_argv(
    region: str,
    local_port: int = DEFAULT_LOCAL_PORT,
    config_path: str = DEFAULT_CONFIG_PATH,
    *,
    binary: str = "vsock-proxy",
) -> list[str]:
    """argv for the systemd unit: ``vsock-proxy 8000 kms.<region>.amazonaws.com 443 --config FILE``."""
    if isinstance(local_port, bool) or not isinstance(local_port, int) or not 1 <= local_port <= 65535:
        raise ConfigError(f"vsock-proxy local port must be 1..65535, got {local_port!r}")
    if not config_path or "\x00" in config_path:
        raise ConfigError("vsock-proxy config path must be a non-empty path")
    return [binary, str(local_port), kms_endpoint(region), str(KMS_PORT), "--config", config_path]


def _check_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} must be 1..65535, got {port!r}")
    return port


def store_endpoint_host(host: str) -> str:
    """``host`` if it is an ElastiCache endpoint host name, else :class:`ConfigError`.

    Lower-case letters, digits, dots and hyphens only (no wildcard, whitespace, newline, quote, brace or
    colon can reach the YAML or the command line), at most 253 characters, every label 1..63 characters
    not starting or ending with a hyphen, and the name ends in ``.cache.amazonaws.com`` or
    ``.cache.amazonaws.com.cn``.
    """
    if not isinstance(host, str):
        raise ConfigError("a state store host name must be a string")
    if len(host) > 253 or not _STORE_HOST_RE.fullmatch(host):
        raise ConfigError(f"not an ElastiCache endpoint host name: {host!r}")
    if not all(_LABEL_RE.fullmatch(label) for label in host.split(".")):
        raise ConfigError(f"not an ElastiCache endpoint host name: {host!r}")
    return host


def store_allowlist_entry(host: str, port: int) -> str:
    """The allowlist line for the state store: ``- {address: HOST, port: PORT}`` (both validated)."""
    return f"- {{address: {store_endpoint_host(host)}, port: {_check_port(port, 'state store port')}}}"


def kms_and_store_allowlist(region: str, host: str, port: int, *, include_fips: bool = False) -> str:
    """The host's allowlist when the state store is deployed: the KMS entry (or entries, see
    :func:`kms_allowlist`) followed by the one store entry."""
    return kms_allowlist(region, include_fips=include_fips) + store_allowlist_entry(host, port) + "\n"


def store_proxy_argv(
    host: str,
    port: int,
    local_port: int = STATE_STORE_VSOCK_PORT,
    config_path: str = DEFAULT_CONFIG_PATH,
    *,
    binary: str = "vsock-proxy",
) -> list[str]:
    """argv of the state store's relay: ``vsock-proxy 8002 HOST PORT --config FILE`` (validated)."""
    _check_port(local_port, "vsock-proxy local port")
    if not config_path or "\x00" in config_path:
        raise ConfigError("vsock-proxy config path must be a non-empty path")
    host = store_endpoint_host(host)
    port = _check_port(port, "state store port")
    return [binary, str(local_port), host, str(port), "--config", config_path]
