"""Rounds: concurrent calls grouped into one round, one round at a time."""

from __future__ import annotations

import asyncio

import pytest

from service.store.group_commit import Outcome, Rounds

pytestmark = pytest.mark.anyio


class Recorder:
    """Runs rounds that double their items, recording each round and pausing in it."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def run(self, items: list[int]) -> list[Outcome]:
        self.rounds.append(items)
        await self.release.wait()
        return [(False, ValueError(item)) if item < 0 else (True, item * 2) for item in items]


async def test_calls_made_together_share_one_round() -> None:
    recorder = Recorder()
    rounds: Rounds[int] = Rounds(recorder.run)
    results = await asyncio.gather(*(rounds.submit(n) for n in range(10)))
    assert results == [n * 2 for n in range(10)]
    assert recorder.rounds == [list(range(10))]


async def test_calls_made_during_a_round_wait_for_the_next() -> None:
    recorder = Recorder()
    recorder.release.clear()
    rounds: Rounds[int] = Rounds(recorder.run)
    first = asyncio.ensure_future(rounds.submit(1))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(rounds.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0.01)
    assert recorder.rounds == [[1]]  # the first round is still running
    recorder.release.set()
    assert await asyncio.gather(first, *later) == [2, 4, 6]
    assert recorder.rounds == [[1], [2, 3]]


async def test_each_call_gets_its_own_outcome() -> None:
    rounds: Rounds[int] = Rounds(Recorder().run)
    results = await asyncio.gather(
        rounds.submit(1), rounds.submit(-1), rounds.submit(2), return_exceptions=True
    )
    assert results[0] == 2 and results[2] == 4
    assert isinstance(results[1], ValueError)


async def test_a_failed_round_fails_every_call_in_it_and_not_the_next() -> None:
    calls = 0

    async def run(items: list[int]) -> list[Outcome]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("the database went away")
        return [(True, item) for item in items]

    rounds: Rounds[int] = Rounds(run)
    failed = await asyncio.gather(rounds.submit(1), rounds.submit(2), return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in failed)
    assert await rounds.submit(3) == 3


async def test_rounds_are_capped_and_a_caller_giving_up_leaves_the_rest() -> None:
    recorder = Recorder()
    recorder.release.clear()
    rounds: Rounds[int] = Rounds(recorder.run, max_batch=3)
    calls = [asyncio.ensure_future(rounds.submit(n)) for n in range(7)]
    await asyncio.sleep(0.01)
    calls[1].cancel()
    recorder.release.set()
    await rounds.drain()
    assert recorder.rounds == [[0, 1, 2], [3, 4, 5], [6]]
    assert calls[1].cancelled()
    assert [call.result() for i, call in enumerate(calls) if i != 1] == [0, 4, 6, 8, 10, 12]


async def test_a_caller_calling_again_at_once_gets_a_round() -> None:
    """A call made as soon as the one before returned, as the round ends, still runs."""
    recorder = Recorder()
    rounds: Rounds[int] = Rounds(recorder.run)
    async with asyncio.timeout(5):
        for n in range(50):
            assert await rounds.submit(n) == n * 2
    assert len(recorder.rounds) == 50
