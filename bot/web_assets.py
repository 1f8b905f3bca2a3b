"""The static assets of a server-rendered sub-app (console, sidebar): one script, one stylesheet, one icon."""

from __future__ import annotations

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
