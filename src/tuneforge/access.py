"""Access tokens for tuneforge's servers (``tuneforge serve``'s ``--api-key``, ``tuneforge ui``'s
``--token``).

What is protected and why: a server bound to a loopback address (``127.0.0.1``, ``::1``,
``localhost``) is reachable only from this machine, so it needs no token unless one is given.
Any other address (``0.0.0.0``, a LAN address) is reachable from other machines: whoever can
connect could run the model or, for the UI, start jobs. There a token is always in force: the
one given, or a fresh random one that the server prints once. Clients send it as
``Authorization: Bearer TOKEN`` (what OpenAI's clients send for their ``api_key``).

The token protects against other people on the network, not eavesdroppers: the servers speak
plain HTTP, so put them behind TLS (a reverse proxy, an SSH tunnel) on an untrusted network.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from tuneforge.errors import TuneforgeError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable only from this machine: ``localhost`` or a loopback
    address (``127.0.0.0/8``, ``::1``). ``0.0.0.0``, ``::`` and ``""`` mean every interface."""
    if host.lower() in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve anywhere
        return False


def access_token(host: str, given: str | None, flag: str) -> str | None:
    """The token a server on ``host`` requires, or None for none.

    Args:
        host: the address the server binds.
        given: the token the user chose (a flag or an environment variable), or None.
        flag: where ``given`` came from (``--api-key``, ``TUNEFORGE_API_KEY``), for the error.

    Returns:
        ``given`` if given; else a new random token (``secrets.token_urlsafe(24)``, 32
        characters) off loopback, None (no authentication) on loopback.

    Raises:
        TuneforgeError: ``given`` is shorter than 16 characters (empty included), or holds
            anything an HTTP header cannot carry as a bearer token (spaces, non-ASCII).
    """
    if given is None:
        return None if is_loopback(host) else secrets.token_urlsafe(24)
    if len(given) < MIN_TOKEN_CHARS:
        raise TuneforgeError(f"{flag} must be at least {MIN_TOKEN_CHARS} characters")
    if not (given.isascii() and given.isprintable() and " " not in given):
        raise TuneforgeError(f"{flag} must be printable ASCII without spaces")
    return given


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (the scheme in any case),
    compared in constant time. A missing header, another scheme or another token: False."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
