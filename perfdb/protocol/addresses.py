"""Network addresses as perfdb writes them: "hostname:port", with IPv6 hosts in brackets."""

from __future__ import annotations

import ipaddress


class AddressError(ValueError):
    """An address that is not "hostname:port"; the message reads after the option's name."""


def parse_address(text: str) -> tuple[str, int]:
    """Split "hostname:port" (or "[v6]:port") into host and port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"must be hostname:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port must be 0-65535, got {port}")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
