"""OPA's ``net.cidr_merge`` and ``net.cidr_contains_matches``.

An IPv4 address without a prefix length is a /32; an IPv6 address needs one
(OPA refuses it). Networks are written in normal form (host bits cleared).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pdp.policy.builtins._types import BuiltinError, type_name

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def _parse(name: str, text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise BuiltinError(name, f"invalid CIDR address or IP: {text!r}") from exc


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


def _contains(outer: Network, inner: Network) -> bool:
    if outer.version != inner.version:
        return False
    return inner.network_address in outer and inner.broadcast_address in outer


def cidr_contains_matches(cidrs: Any, cidrs_or_ips: Any) -> set[tuple[Any, Any]]:
    """Every pair (key of a network in ``cidrs``, key of an address or network in ``cidrs_or_ips``)
    where the first contains the second."""
    name = "net.cidr_contains_matches"
    outer = [(k, _parse(name, a)) for k, a in _entries(name, 1, cidrs)]
    inner = [(k, _parse(name, a)) for k, a in _entries(name, 2, cidrs_or_ips)]
    return {(ko, ki) for ko, o in outer for ki, i in inner if _contains(o, i)}
