"""What the server-rendered sub-apps (console, sidebar) share: their static assets and security headers."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web


def asset_routes(name: str, *, js: str, css: str, favicon: str) -> list[web.RouteDef]:
    """GET /static/{name}.js, /static/{name}.css and /static/favicon.svg, served from strings in memory."""

    def serve(text: str, content_type: str, cache: str) -> web.Response:
        charset = None if content_type == "image/svg+xml" else "utf-8"
        return web.Response(text=text, content_type=content_type, charset=charset, headers={"Cache-Control": cache})

    async def script(_request: web.Request) -> web.Response:
        return serve(js, "text/javascript", "no-cache")

    async def style(_request: web.Request) -> web.Response:
        return serve(css, "text/css", "no-cache")

    async def icon(_request: web.Request) -> web.Response:
        return serve(favicon, "image/svg+xml", "max-age=86400")

    return [
        web.get(f"/static/{name}.js", script),
        web.get(f"/static/{name}.css", style),
        web.get("/static/favicon.svg", icon),
    ]


def page_csp(script_sources: Sequence[str] = ()) -> str:
    """The Content-Security-Policy of our pages: nothing inline, everything from this origin (plus named scripts)."""
    scripts = " ".join(["'self'", *script_sources])
    return (
        f"default-src 'none'; script-src {scripts}; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def set_page_headers(response: web.StreamResponse, csp: str, *, deny_framing: bool) -> None:
    """Security headers for a page or API answer, unless the handler set its own."""
    response.headers.setdefault("Content-Security-Policy", csp)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if deny_framing:
        response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cache-Control", "no-store")
