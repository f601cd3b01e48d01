"""
C{tickstock-token}: mint a client token for a user, for operators and tests.
The secret is read like the daemon reads it (file or TICKSTOCK_JWT_SECRET),
never from the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tickstock.config import SECRET_ENV, ConfigError, read_secret
from tickstock.deliver.auth import JWTAuthenticator

DESCRIPTION = (
    "Mint a client token (an HS256 JWT) for a user, for operators and tests. The secret is "
    f"read as the daemon reads it, from --secret-file or ${SECRET_ENV}, never from the command "
    "line."
)
"""The C{--help} text: plain sentences, since argparse shows it as it is."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: prints one token."""
    parser = argparse.ArgumentParser(prog="tickstock-token", description=DESCRIPTION)
    parser.add_argument("--user", required=True, help="the user id (the token's sub)")
    parser.add_argument("--ttl", type=float, default=3600,
                        help="seconds the token is valid (default 3600)")
    parser.add_argument("--secret-file", help=f"file holding the secret (default: ${SECRET_ENV})")
    parser.add_argument("--audience", help="aud claim, if the daemon checks one")
    parser.add_argument("--issuer", help="iss claim, if the daemon checks one")
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args.secret_file, os.environ)
    except (ConfigError, OSError) as error:
        parser.error(str(error))
    if secret is None:
        parser.error(f"give --secret-file or set {SECRET_ENV}")
    if args.ttl <= 0:
        parser.error("--ttl: must be positive")
    auth = JWTAuthenticator(secret, audience=args.audience, issuer=args.issuer)
    try:
        token = auth.mint(args.user, time.time(), args.ttl)
        auth({"token": token})
    except Exception as error:
        parser.error(str(error))
    sys.stdout.write(token + "\n")
