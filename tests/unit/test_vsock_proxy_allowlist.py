"""The vsock-proxy allowlist names the region's KMS endpoint and nothing else."""

from __future__ import annotations

import doctest

import pytest
import yaml

import parent_app.vsock_proxy as vp
from nitrovault.errors import ConfigError
from parent_app.vsock_proxy import kms_allowlist, kms_endpoint, vsock_proxy_argv


def test_allowlist_is_the_documented_format() -> None:
    assert kms_allowlist("us-east-1") == "allowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n"


@pytest.mark.parametrize(
    ("region", "host"),
    [
        ("eu-central-2", "kms.eu-central-2.amazonaws.com"),
        ("ap-southeast-5", "kms.ap-southeast-5.amazonaws.com"),
        ("il-central-1", "kms.il-central-1.amazonaws.com"),
        ("us-gov-west-1", "kms.us-gov-west-1.amazonaws.com"),
        ("cn-north-1", "kms.cn-north-1.amazonaws.com.cn"),
        ("cn-northwest-1", "kms.cn-northwest-1.amazonaws.com.cn"),
    ],
)
def test_allowlist_parses_as_yaml_with_one_entry(region: str, host: str) -> None:
    doc = yaml.safe_load(kms_allowlist(region))
    assert doc == {"allowlist": [{"address": host, "port": 443}]}


def test_fips_is_only_added_when_asked() -> None:
    doc = yaml.safe_load(kms_allowlist("us-west-2", include_fips=True))
    assert doc["allowlist"] == [
        {"address": "kms.us-west-2.amazonaws.com", "port": 443},
        {"address": "kms-fips.us-west-2.amazonaws.com", "port": 443},
    ]
    assert "fips" not in kms_allowlist("us-west-2")


def test_no_fips_endpoint_in_china() -> None:
    with pytest.raises(ConfigError):
        kms_allowlist("cn-north-1", include_fips=True)
    with pytest.raises(ConfigError):
        kms_endpoint("cn-north-1", fips=True)


@pytest.mark.parametrize(
    "region",
    [
        "",
        "US-EAST-1",
        "us-east",
        "us-east-1a",
        "us-east-0",
        "us-east-1.evil.com",
        "us-east-1\n- {address: evil.com, port: 443}",
        "evil.com/us-east-1",
        "us east 1",
        "*",
        "us-east-1 ",
    ],
)
def test_malformed_region_is_rejected(region: str) -> None:
    with pytest.raises(ConfigError):
        kms_allowlist(region)
    with pytest.raises(ConfigError):
        vsock_proxy_argv(region)


@pytest.mark.parametrize("region", ["us-iso-east-1", "us-isob-east-1"])
def test_unverified_partitions_are_rejected(region: str) -> None:
    with pytest.raises(ConfigError, match="partition"):
        kms_allowlist(region)


def test_argv_matches_the_systemd_unit() -> None:
    assert vsock_proxy_argv("us-east-1") == [
        "vsock-proxy",
        "8000",
        "kms.us-east-1.amazonaws.com",
        "443",
        "--config",
        "/etc/nitro_enclaves/vsock-proxy.yaml",
    ]


def test_argv_custom_port_config_and_china() -> None:
    argv = vsock_proxy_argv("cn-north-1", local_port=8100, config_path="/run/nv/proxy.yaml")
    assert argv == [
        "vsock-proxy",
        "8100",
        "kms.cn-north-1.amazonaws.com.cn",
        "443",
        "--config",
        "/run/nv/proxy.yaml",
    ]


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_argv_rejects_bad_port(port: int) -> None:
    with pytest.raises(ConfigError):
        vsock_proxy_argv("us-east-1", local_port=port)


def test_argv_rejects_empty_config_path() -> None:
    with pytest.raises(ConfigError):
        vsock_proxy_argv("us-east-1", config_path="")


def test_module_example_runs() -> None:
    result = doctest.testmod(vp)
    assert result.attempted > 0
    assert result.failed == 0


# -- the state store entry --------------------------------------------------------------------------------

STORE = "master.nitrovault-state-store.abc123.use1.cache.amazonaws.com"


@pytest.mark.parametrize(
    "host",
    [
        STORE,
        "nitrovault-state-store.abc123.ng.0001.use1.cache.amazonaws.com",
        "master.nv.abc123.cnn1.cache.amazonaws.com.cn",
    ],
)
def test_store_entry_accepts_elasticache_endpoints(host: str) -> None:
    assert vp.store_allowlist_entry(host, 6379) == f"- {{address: {host}, port: 6379}}"


@pytest.mark.parametrize(
    "host",
    [
        "",
        "*.cache.amazonaws.com",  # wildcard
        "*",
        f"{STORE}\n- {{address: evil.example.com, port: 443}}",  # newline: a second YAML entry
        f"{STORE}, port: 443}}\n- {{address: evil.example.com",  # YAML flow-mapping injection
        f"{{address: {STORE}}}",
        f"{STORE}:6379",  # a port smuggled into the host
        f"{STORE} 443",
        f"{STORE}#",
        "evil.example.com",  # other domains
        "cache.amazonaws.com.evil.example.com",
        "master.nv.abc123.use1.cache.amazonaws.com.evil",
        "kms.us-east-1.amazonaws.com",
        "cache.amazonaws.com",  # no name before the suffix
        ".cache.amazonaws.com",
        "master..nv.cache.amazonaws.com",  # empty label
        "-master.nv.cache.amazonaws.com",  # label starting with a hyphen
        "master-.nv.cache.amazonaws.com",
        "MASTER.nv.abc123.use1.cache.amazonaws.com",  # upper case
        "master.nv.abc123.use1.cache.amazonaws.com.",  # trailing dot
        "master.nv'.cache.amazonaws.com",  # shell quote
        "master.nv\x00.cache.amazonaws.com",
        ("a" * 64) + ".cache.amazonaws.com",  # label too long
        ".".join(["a" * 60] * 4) + ".cache.amazonaws.com",  # name too long
    ],
)
def test_store_entry_rejects_anything_else(host: str) -> None:
    with pytest.raises(ConfigError):
        vp.store_allowlist_entry(host, 6379)
    with pytest.raises(ConfigError):
        vp.store_proxy_argv(host, 6379)
    with pytest.raises(ConfigError):
        vp.kms_and_store_allowlist("us-east-1", host, 6379)


@pytest.mark.parametrize("host", [None, 6379, b"master.nv.cache.amazonaws.com"])
def test_store_host_must_be_a_string(host: object) -> None:
    with pytest.raises(ConfigError):
        vp.store_endpoint_host(host)  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [0, -1, 65536, True, "6379", 6379.0])
def test_store_entry_rejects_bad_ports(port: object) -> None:
    with pytest.raises(ConfigError):
        vp.store_allowlist_entry(STORE, port)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        vp.store_proxy_argv(STORE, port)  # type: ignore[arg-type]


def test_kms_and_store_allowlist_parses_as_yaml_with_exactly_two_entries() -> None:
    doc = yaml.safe_load(vp.kms_and_store_allowlist("us-east-1", STORE, 6379))
    assert doc == {
        "allowlist": [
            {"address": "kms.us-east-1.amazonaws.com", "port": 443},
            {"address": STORE, "port": 6379},
        ]
    }
    china = yaml.safe_load(
        vp.kms_and_store_allowlist("cn-north-1", "m.nv.x.cnn1.cache.amazonaws.com.cn", 6380))
    assert [e["address"] for e in china["allowlist"]] == [
        "kms.cn-north-1.amazonaws.com.cn",
        "m.nv.x.cnn1.cache.amazonaws.com.cn",
    ]


def test_store_proxy_argv_uses_the_state_store_vsock_port() -> None:
    assert vp.STATE_STORE_VSOCK_PORT == 8002
    assert vp.store_proxy_argv(STORE, 6379) == [
        "vsock-proxy",
        "8002",
        STORE,
        "6379",
        "--config",
        "/etc/nitro_enclaves/vsock-proxy.yaml",
    ]
    with pytest.raises(ConfigError):
        vp.store_proxy_argv(STORE, 6379, local_port=0)
    with pytest.raises(ConfigError):
        vp.store_proxy_argv(STORE, 6379, config_path="")


def test_store_host_pattern_is_the_one_the_boot_script_greps() -> None:
    import re

    # POSIX ERE and Python agree on this pattern (no lookarounds or (?:...) groups)
    assert "(?" not in vp.STORE_HOST_PATTERN
    assert re.fullmatch(vp.STORE_HOST_PATTERN, STORE)
    assert not re.fullmatch(vp.STORE_HOST_PATTERN, "evil.example.com")
