"""The upstream client of every connector instance, by the instance's name.

Each instance is its own Open Connectors account: its own base URL, credentials and
rate of calls, so each has a client of its own, and a job's every call goes to the
client of the instance the job was submitted to. A job whose instance is no longer
configured has no client: its stored state is still served, nothing is sent upstream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from service.errors import ApiError
from service.jobs import Job
from service.upstream.client import UpstreamClient

__all__ = ["Upstreams", "unknown_instance"]


def unknown_instance(name: str) -> ApiError:
    """The answer to a request naming an instance that is not configured."""
    shown = repr(name) if len(name) <= 40 and name.isprintable() else "given"
    return ApiError(f"no connector instance {shown} is configured", code="unknown_instance")


class Upstreams(Mapping[str, UpstreamClient]):
    """Instance name -> its client, in the configured order; the first is the default."""

    def __init__(self, clients: Mapping[str, UpstreamClient], default: str) -> None:
        if default not in clients:
            raise ValueError(f"the default instance {default!r} has no client")
        self._clients = dict(clients)
        self.default_name = default

    @classmethod
    def single(cls, client: UpstreamClient, name: str = "default") -> Upstreams:
        """One client as the only instance's (a single-instance set-up)."""
        return cls({name: client}, name)

    def __getitem__(self, name: str) -> UpstreamClient:
        return self._clients[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def default(self) -> UpstreamClient:
        return self._clients[self.default_name]

    def named(self, name: str | None) -> UpstreamClient:
        """The client of instance ``name`` (the default one for None), or the 400
        ``unknown_instance`` for a name that is not configured."""
        client = self._clients.get(name if name is not None else self.default_name)
        if client is None:
            raise unknown_instance(name or "")
        return client

    def for_job(self, job: Job) -> UpstreamClient:
        """The client of ``job``'s instance; 409 ``unknown_instance`` when that instance
        is no longer configured (nothing can be asked upstream about the job)."""
        client = self._clients.get(job.instance)
        if client is None:
            raise ApiError(
                f"the job's connector instance {job.instance!r} is not configured: nothing"
                " can be asked upstream about it",
                code="unknown_instance",
                status=409,
            )
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
