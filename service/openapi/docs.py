"""``/docs``: the API description rendered by Swagger UI, served from this process.

The assets (Swagger UI 5, which reads OpenAPI 3.1) come from the ``swagger-ui-py``
package, so the page works offline and fetches nothing from the internet.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["routes"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>bulkhook API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""


async def _docs(request: Request) -> Response:
    policy = "default-src 'self' 'unsafe-inline' data:"
    return HTMLResponse(_PAGE, headers={"Content-Security-Policy": policy})


def routes() -> list[BaseRoute]:
    return [
        Route("/docs", _docs, methods=["GET"]),
        Mount("/docs/static", app=StaticFiles(directory=str(files("swagger_ui") / "static"))),
    ]
