"""Configuration for AWS's ``vsock-proxy``: the parent's only door from the enclave to KMS.

The enclave reaches KMS through ``vsock-proxy`` on the parent (vsock ``(3, 8000)``), a raw TCP relay;
TLS runs end to end from the enclave, so the parent cannot read or forge KMS answers (see
``../shared/DESIGN.md``, "Trust decisions"). What the parent *can* decide is where the relay may go, and
this module keeps that as narrow as possible.

Invariants:

* The allowlist names exactly the region's KMS endpoint (and, only when asked, its FIPS twin) on port
  443, never a wildcard and never another service: a compromised enclave image, or anyone who gets
  to speak vsock, can use the proxy to reach that one host and nothing else.
* The region name is validated before it is put into a host name, so no input can smuggle another
  host, a port or YAML syntax into the allowlist.
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
