"""The UI's guard, in front of every request (../shared/RELIABILITY.md, docs/ui.md#security).

- Bound to loopback, a request must name a loopback host (`Host: 127.0.0.1:PORT` or `localhost`): a page
  of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding) is refused.
- With a token (`--token`, required off loopback), every request but the login page carries it: the
  `Authorization: Bearer TOKEN` header or the cookie the login page sets (HttpOnly, SameSite=Strict).
- Every POST carries this process's CSRF token (`X-CSRF-Token`, from the page's `<meta name=csrf>`),
  comes from this origin (`Origin` equal to the request's own, `Sec-Fetch-Site` same-origin when sent):
  cross-site POSTs are refused, and a custom header cannot be sent cross-site without a CORS grant,
  which the UI never gives.
- Pages may load only their own scripts, styles and images (Content-Security-Policy), never in a frame.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse

COOKIE = "tunelab_ui_token"
OPEN = ("/login", "/static/")  # reachable without the token (the login page, its script and style)
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """`127.0.0.1:8000` -> `127.0.0.1`, `[::1]:8000` -> `::1`."""
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass
class Guard:
    token: str | None
    loopback: bool
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def has_token_value(self, value: str) -> bool:
        return self.token is not None and hmac.compare_digest(value.encode(), self.token.encode())

    def has_token(self, request: Request) -> bool:
        if self.token is None:
            return True
        bearer = request.headers.get("authorization", "")
        return self.has_token_value(bearer.removeprefix("Bearer ")) and bearer.startswith("Bearer ") or \
            self.has_token_value(request.cookies.get(COOKIE, ""))

    def refusal(self, request: Request) -> tuple[int, str] | None:
        """Why this request is refused (status, one line), or None."""
        host = request.headers.get("host", "")
        if self.loopback and not is_loopback(_host_name(host)):
            return 403, f"Host {host!r} is not this server's: open it as http://127.0.0.1:PORT"
        if request.method in ("GET", "HEAD"):
            return None
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return 403, f"a {site} request cannot change anything here: use the UI's own pages"
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}":
            return 403, f"a request from {origin} cannot change anything here: use the UI's own pages"
        got = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(got.encode(), self.csrf.encode()):
            return 403, "the CSRF token is missing or stale: reload the page and try again"
        return None

    async def __call__(self, request: Request, call_next: Any) -> Any:
        refused = self.refusal(request)
        if refused is None and not request.url.path.startswith(OPEN) and not self.has_token(request):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                return RedirectResponse("/login", status_code=303)
            refused = 401, "a valid token is required: log in at /login or send Authorization: Bearer TOKEN"
        if refused is not None:
            response: Any = JSONResponse({"error": refused[1]}, status_code=refused[0])
        else:
            response = await call_next(request)
        for k, v in HEADERS.items():
            response.headers.setdefault(k, v)
        return response
