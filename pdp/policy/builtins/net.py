"""OPA's ``net.cidr_merge``, ``net.cidr_contains``, ``net.cidr_contains_matches`` and ``net.cidr_intersects``
(and, for Rego v0, the deprecated ``net.cidr_overlap``).

For ``net.cidr_merge`` an IPv4 address without a prefix length is a /32; an
IPv6 address needs one (OPA refuses it). Networks are written in normal form
(host bits cleared). ``net.cidr_contains_matches`` decides containment as Go's
``net`` package does for OPA: the networks of its first operand need a prefix
length, and an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, as a dual-stack
socket reports an IPv4 client) is its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pdp.policy.builtins._types import BuiltinError, type_name

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _merge_network(name: str, text: Any) -> Network:
    if not isinstance(text, str):
        raise BuiltinError(name, f"element must be string but got {type_name(text)}")
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise BuiltinError(name, f"invalid CIDR address or IP: {text!r}") from exc
    if address.version == 6:
        raise BuiltinError(name, "IPv6 invalid: needs prefix length")
    return ipaddress.ip_network(text)


def cidr_merge(addrs: Any) -> set[str]:
    """The smallest set of networks that covers exactly the given addresses and networks."""
    name = "net.cidr_merge"
    if not isinstance(addrs, list | set | frozenset):
        raise BuiltinError(name, f"operand 1 must be any of array, set but got {type_name(addrs)}")
    networks = [_merge_network(name, a) for a in addrs]
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return {str(n) for n in ipaddress.collapse_addresses(v4)} | {str(n) for n in ipaddress.collapse_addresses(v6)}


def _parse_cidr(text: str) -> Network | None:
    """Go's ``net.ParseCIDR``: an address without a zone, a slash and a decimal prefix length."""
    address, slash, prefix = text.partition("/")
    if not slash or "%" in address or not (prefix.isascii() and prefix.isdigit()):
        return None
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _parse_ip(text: str) -> Address | None:
    """Go's ``net.ParseIP``: an IPv4 or IPv6 address without a zone."""
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _to4(address: Address) -> Address:
    """Go's ``IP.To4``: an IPv4-mapped IPv6 address is the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _net_contains(network: Network, address: Address) -> bool:
    """Go's ``IPNet.Contains``: IPv4-mapped addresses, and a network of them, compare as IPv4."""
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped is not None:
        network = ipaddress.IPv4Network((network.network_address.ipv4_mapped, max(network.prefixlen - 96, 0)),
                                        strict=False)
    address = _to4(address)
    return network.version == address.version and address in network


def _entries(name: str, pos: int, value: Any) -> list[tuple[Any, str]]:
    """(key, address) for each member: a string is its own key; arrays key by index, objects by key,
    sets by the member; a member that is an array holds the address first."""
    if isinstance(value, str):
        return [(value, value)]
    if isinstance(value, list):
        pairs = list(enumerate(value))
    elif isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, set | frozenset):
        pairs = [(v, v) for v in value]
    else:
        raise BuiltinError(name, f"operand {pos} must be any of string, array, object, set but got "
                                 f"{type_name(value)}")
    out: list[tuple[Any, str]] = []
    for key, member in pairs:
        if isinstance(member, str):
            out.append((key, member))
        elif isinstance(member, list | tuple) and member and isinstance(member[0], str):
            out.append((tuple(key) if isinstance(key, list) else key, member[0]))
        else:
            raise BuiltinError(name, f"operand {pos}: element must be string or non-empty array")
    return out


def _contains(name: str, cidr: str, cidr_or_ip: str) -> bool:
    """OPA's ``net.cidr_contains``: an address in the network, or a network's first and last addresses."""
    outer = _parse_cidr(cidr)
    if outer is None:
        raise BuiltinError(name, f"invalid CIDR address: {cidr}")
    address = _parse_ip(cidr_or_ip)
    if address is not None:
        return _net_contains(outer, address)
    inner = _parse_cidr(cidr_or_ip)
    if inner is None:
        raise BuiltinError(name, f"not a valid textual representation of an IP address or CIDR: {cidr_or_ip}")
    return _net_contains(outer, inner.network_address) and _net_contains(outer, inner.broadcast_address)


def cidr_contains(cidr: Any, cidr_or_ip: Any) -> bool:
    """OPA's ``net.cidr_contains``, in place of the engine's own, which does not see an IPv4 client reported
    as IPv4-mapped IPv6 (``::ffff:10.0.0.1``) in an IPv4 network: a denylist would let it through."""
    name = "net.cidr_contains"
    for pos, value in ((1, cidr), (2, cidr_or_ip)):
        if not isinstance(value, str):
            raise BuiltinError(name, f"operand {pos} must be string but got {type_name(value)}")
    return _contains(name, cidr, cidr_or_ip)


def cidr_contains_matches(cidrs: Any, cidrs_or_ips: Any) -> set[tuple[Any, Any]]:
    """Every pair (key of a network in ``cidrs``, key of an address or network in ``cidrs_or_ips``)
    where the first contains the second, as OPA's ``net.cidr_contains`` decides it (Go's ``net`` package:
    an IPv4-mapped IPv6 address such as a dual-stack socket reports is the IPv4 address)."""
    name = "net.cidr_contains_matches"
    outer = _entries(name, 1, cidrs)
    inner = _entries(name, 2, cidrs_or_ips)
    return {(ko, ki) for ko, o in outer for ki, i in inner if _contains(name, o, i)}


def cidr_intersects(cidr1: Any, cidr2: Any) -> bool:
    """OPA's ``net.cidr_intersects``: whether the networks share an address (either holds the other's first
    address, as Go's ``IPNet.Contains`` decides it)."""
    name = "net.cidr_intersects"
    networks: list[Network] = []
    for pos, value in ((1, cidr1), (2, cidr2)):
        if not isinstance(value, str):
            raise BuiltinError(name, f"operand {pos} must be string but got {type_name(value)}")
        network = _parse_cidr(value)
        if network is None:
            raise BuiltinError(name, f"invalid CIDR address: {value}")
        networks.append(network)
    a, b = networks
    return _net_contains(a, b.network_address) or _net_contains(b, a.network_address)


def cidr_overlap(cidr: Any, ip: Any) -> bool:
    """OPA's deprecated ``net.cidr_overlap`` (Rego v0): ``net.cidr_contains`` under its old name."""
    name = "net.cidr_overlap"
    for pos, value in ((1, cidr), (2, ip)):
        if not isinstance(value, str):
            raise BuiltinError(name, f"operand {pos} must be string but got {type_name(value)}")
    return _contains(name, cidr, ip)
