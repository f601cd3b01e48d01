"""Origins as the browser sends them, made comparable (C{--allowed-origins})."""

from __future__ import annotations

import re

_ORIGIN = re.compile(r"^(https?)://([A-Za-z0-9.\-\[\]:]+?)(?::(\d{1,5}))?$")


def normalize_origin(value: str) -> str:
    """
    Return C{scheme://host:port} with the port made explicit, so that an
    origin with an implied default port matches its explicit spelling.

    @raise ValueError: for anything that is not an http(s) origin.
    """
    match = _ORIGIN.match(value.strip().lower())
    if not match:
        raise ValueError(f"not an http(s) origin: {value!r}")
    scheme, host, port = match.groups()
    port = port or ("443" if scheme == "https" else "80")
    return f"{scheme}://{host}:{port}"
