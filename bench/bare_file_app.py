"""The serving baseline: a bare Starlette ``FileResponse`` of one file.

``python bench/bare_file_app.py PORT FILE [HTTP LOOP]`` serves FILE at ``GET /file``
under uvicorn with the settings ``bulkhook serve`` runs it with (its HTTP protocol, on
the parser and event loop named, by default httptools and uvloop; no access log,
proxy headers), so that a comparison with ``GET /jobs/{id}/result`` sets the service's
own work against the same server doing nothing but stream the file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.server.protocol import http_protocol


async def serve_file(request: Request) -> FileResponse:
    return FileResponse(os.environ["BENCH_FILE"], media_type="text/csv")


app = Starlette(routes=[Route("/file", serve_file, methods=["GET", "HEAD"])])


def main() -> None:
    port, path = int(sys.argv[1]), sys.argv[2]
    http, loop = sys.argv[3:5] if len(sys.argv) > 4 else ("auto", "auto")
    os.environ["BENCH_FILE"] = path
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=30,
        http=http_protocol(implementation=http),
        loop=loop,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
