"""Starting the console from ``fedraft audit serve``: check the TLS files, verify once, listen.

Kept out of ``audit.cli`` so the command there stays a thin layer of options; every usage
problem comes back as a ``LaunchError`` that the command prints as one ``error:`` line.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.audit.console.app import create_app
from coordinator.audit.console.data import ConsoleSource, Verifier
from coordinator.audit.console.server import bind, serve, server_context
from coordinator.audit.entry import Checkpoint
from coordinator.audit.keys import key_id_for


class LaunchError(ValueError):
    """The console cannot start as asked (unusable TLS files, a port in use)."""


def verify_options(
    genesis_key: bytes | None, head: Checkpoint | None, charges: bool
) -> tuple[dict[str, Any], str | None]:
    """``verify`` options, and what the banner names as the pinned signer (None: unpinned).

    Charges are recomputed only on request: the PRV accountant takes seconds per site, and
    the console re-verifies whenever the log grows.
    """
    options: dict[str, Any] = {}
    pinned: str | None = None
    if genesis_key is not None:
        options["genesis_key"] = genesis_key
        pinned = key_id_for(genesis_key)
    if head is not None:
        options["trusted_head"] = head
        pinned = pinned or f"{head.key_id} (by the signed head)"
    if charges:
        from coordinator.audit.charges import prv_epsilon

        options["accountant"] = prv_epsilon
    return options, pinned


def launch(
    source: ConsoleSource,
    *,
    genesis_key: bytes | None,
    head: Checkpoint | None,
    charges: bool,
    tls: tuple[Path, Path, Path | None],
    address: tuple[str, int],
    recheck: float,
    on_ready: Callable[[dict[str, Any]], None],
) -> None:
    """Serve ``source`` until SIGINT/SIGTERM; ``on_ready`` gets {url, source, status}.

    ``tls`` is (CA, certificate, key or None for the certificate's name with ``.key``).
    """
    ca, cert, key = tls
    key = key or cert.with_suffix(".key")
    try:
        context = server_context(ca, cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise LaunchError(f"unusable TLS files (--ca {ca}, --cert {cert}, key {key}): "
                          f"{_first_line(exc)}") from exc
    options, pinned = verify_options(genesis_key, head, charges)
    verifier = Verifier(source, options, pinned_key=pinned, recheck=recheck)
    first = verifier.current()  # once at start; then again as the log grows or ages
    host, port = address
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise LaunchError(f"cannot listen on {host}:{port}: {_first_line(exc)}") from exc

    def ready(url: str) -> None:
        on_ready({"url": url, "source": source.describe(), "status": first.status})

    serve(create_app(source, verifier), context, sock, on_ready=ready)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
