"""The baseline: a bare Starlette endpoint that only reads the body."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def receive(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"})


app = Starlette(routes=[Route("/callbacks/jobs/{job_id}", receive, methods=["POST"])])
