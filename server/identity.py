"""Who a request comes from, the same way for HTTP and WebSocket.

The identity names the owner of a session (its archived audio) and the bucket its rate limit
counts in, so the download route and the stream route must never compute it differently.
"""

from __future__ import annotations

import ipaddress

from starlette.requests import HTTPConnection


def client_identity(conn: HTTPConnection, key_name: str | None) -> str:
    """`key:<name>` when the client gave a configured API key, else `ip:<address>`."""
    if key_name:
        return f"key:{key_name}"
    return f"ip:{conn.client.host if conn.client else 'unknown'}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
