"""``fedraft audit serve``: a read-only auditor console in the browser.

Pages (overview, runs, rounds, one round, model lineage, privacy spend, exports) are rendered
on the server from Jinja2 templates by a Starlette app (``app``), each with a JSON twin
under ``/api`` that prints what ``fedraft audit ... --json`` prints. Every page carries the
verification verdict as a banner: green when the log verifies under a pinned key, amber when
it is only self-consistent (no --key/--head), red when it fails (``data.Verifier`` keeps it
current). There are GET routes only; any other method is answered 405.

Access is mutual TLS with the federation CA, auditors only (``server``): uvicorn serves with
``CERT_REQUIRED``, a subclass of its h11 protocol hands the verified peer certificate to the
app as the ASGI TLS extension, and a middleware refuses (403) any role but ``auditor``. The
console presents a certificate of its own; the auditor's certificate does (``pki.issue``
gives every certificate serverAuth and names 127.0.0.1/localhost), so one identity serves
and opens the console; the browser must trust the federation CA (or be told to).
"""

from coordinator.audit.console.app import create_app
from coordinator.audit.console.data import Verification, Verifier
from coordinator.audit.console.server import RequireRole, serve, server_context

__all__ = ["RequireRole", "Verification", "Verifier", "create_app", "serve", "server_context"]
