"""KMS's regional endpoints: the host name a client connects to (and checks the certificate for).

Pure. Only the ``aws`` and ``aws-cn`` partitions: GovCloud (``us-gov-*``) lives in ``amazonaws.com``,
China (``cn-*``) in ``amazonaws.com.cn``; the isolated partitions (``us-iso-*``...) have other suffixes
and are refused rather than guessed.

Example::

    >>> kms_hostname("eu-west-1")
    'kms.eu-west-1.amazonaws.com'
    >>> kms_hostname("cn-north-1")
    'kms.cn-north-1.amazonaws.com.cn'
    >>> kms_endpoint("us-gov-west-1")
    'https://kms.us-gov-west-1.amazonaws.com'
    >>> partition("cn-north-1"), partition("us-gov-west-1"), partition("eu-west-1")
    ('aws-cn', 'aws-us-gov', 'aws')
"""

from __future__ import annotations

import re

from nitrovault.errors import ConfigError

#: an AWS region name of the aws / aws-cn / aws-us-gov partitions (``eu-west-1``, ``us-gov-east-1``)
REGION_RE = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-[1-9][0-9]?")


def check_region(region: str) -> str:
    """``region`` itself when it is a region name this module knows the DNS suffix of, else ConfigError."""
    if not isinstance(region, str) or not REGION_RE.fullmatch(region):
        raise ConfigError(f"not an AWS region name: {region!r}")
    return region


def partition(region: str) -> str:
    """The ARN partition of ``region``: ``aws-cn`` (``cn-*``), ``aws-us-gov`` (``us-gov-*``), else ``aws``."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def kms_hostname(region: str) -> str:
    """KMS's host name in ``region`` (the China partition has its own DNS suffix)."""
    check_region(region)
    return f"kms.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else "")


def kms_endpoint(region: str) -> str:
    """``https://`` + :func:`kms_hostname` (port 443)."""
    return f"https://{kms_hostname(region)}"
