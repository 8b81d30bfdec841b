"""Where an admin may point a deployment: the rule for `api_base`, in one place.

Refused: cloud-metadata and link-local addresses (169.254.0.0/16, fe80::/10,
fd00:ec2::254, Alibaba's 100.100.100.200), the metadata services' host names, URLs
carrying user-info (user:pass@host: credentials belong in api_key, and an `@` makes
the real host easy to misread), and any scheme but http(s). Private ranges and
loopback stay allowed: on-prem model servers live there. GATEWAY_API_BASE_ALLOW
(hosts or CIDRs) lets an admin permit an exception on purpose.

Host names are not resolved here: DNS can change after saving, and a name may only
resolve from the gateway's own network. Literal addresses and known metadata names
are checked when a deployment is saved, and again when the routing table is built
(so a row stored before this rule is never called).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from django.conf import settings

_REFUSED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # IPv4 link-local, incl. 169.254.169.254 (AWS, GCP, Azure, …)
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
    )
)
_METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)


def _allowed(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    for entry in settings.GATEWAY_API_BASE_ALLOW:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:  # a host name (the setting was checked at start-up)
            if entry == host:
                return True
            continue
        if address is not None and address in network:
            return True
    return False


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return address


def api_base_problem(value: str) -> str | None:
    """Why `value` may not be a deployment's api_base, or None when it may."""
    if not value:
        return None
    try:
        parts = urlsplit(value.strip())
        host = (parts.hostname or "").rstrip(".").lower()
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "api_base is not a valid URL."
    if parts.scheme not in ("http", "https") or not host:
        return "api_base must be an http(s) URL such as https://api.openai.com/v1."
    if "@" in parts.netloc:
        return (
            "api_base must not carry a user name or password (user:pass@host); "
            "put the provider's credential in api_key."
        )
    address = _address(host)
    refused = (
        address is not None and any(address in network for network in _REFUSED_NETWORKS)
    ) or host in _METADATA_NAMES
    if refused and not _allowed(host, address):
        return (
            f"api_base may not point at {host}: link-local and cloud-metadata addresses are "
            "refused (add it to GATEWAY_API_BASE_ALLOW to permit it on purpose)."
        )
    return None
