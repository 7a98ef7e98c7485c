"""The server's generation scheduling: all model work on one worker thread, in arrival order, so the event loop never
blocks and the model never runs twice at once. Requests that arrive within `wait_ms` of each other and share their
sampling settings (their key) go through one batched call: answered ones together through `answer`, streamed ones
together through `stream` (each row's pieces to its own client as they come)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple

# answer(conversations, passages, max_tokens, temperature, top_p, batch_size, stops, expected=) -> one result each
Answer = Callable[..., list[dict]]
# stream(conversations, max_tokens, temperature, top_p, cancels, emits) -> one final info per conversation
Stream = Callable[..., list[dict]]


class BatchKey(NamedTuple):
    """What requests batched together share: streamed or answered, and their sampling settings."""

    stream: bool  # streamed (through `stream`, pieces as they come) or answered (through `answer`)
    max_tokens: int
    temperature: float
    top_p: float
    stops: tuple[str, ...] = ()  # an answered request's stop strings (a streamed one's are cut by its route)


@dataclass
class Job:
    key: BatchKey
    messages: list[dict]
    passages: list[str] | None = None
    expected: list[int] | None = None  # the rows the question asked about (1-based among passages)
    future: asyncio.Future | None = None  # an answered job's result
    emit: Callable[[str], None] | None = None  # a streamed job's pieces, called on the worker thread
    cancel: threading.Event | None = None  # set when a streamed job's client has gone
    pieces: asyncio.Queue | None = None  # a streamed job's end: ("end", info) or ("error", exception)

    def gone(self) -> bool:
        """The client went away: nothing to generate for it."""
        return self.cancel.is_set() if self.cancel is not None else self.future.done()


class Batcher:
    """Queue of jobs and the one worker thread that runs them; start() and stop() inside the server's event loop."""

    def __init__(self, answer: Answer, stream: Stream, batch_size: int = 8, wait_ms: float = 10.0):
        self.answer_fn, self.stream_fn = answer, stream
        self.batch_size, self.wait_s = batch_size, wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.worker: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collegeadvisor-model")
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    def stop(self) -> None:
        self.task.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def answer(self, key: BatchKey, messages: list[dict], passages: list[str] | None,
                     expected: list[int] | None = None) -> dict:
        """The result of `answer` for one conversation, generated in a batch with those that arrived beside it."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Job(key, messages, passages, expected, future=future))
        return await future

    async def stream(self, key: BatchKey, messages: list[dict], emit: Callable[[str], None], cancel: threading.Event,
                     pieces: asyncio.Queue) -> None:
        """Queue one streamed conversation: `emit` gets its pieces, then `pieces` its end."""
        await self.queue.put(Job(key, messages, emit=emit, cancel=cancel, pieces=pieces))

    async def _loop(self) -> None:
        while True:
            groups: dict[BatchKey, list[Job]] = {}
            for job in await self._gather():
                groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                jobs = [j for j in jobs if not j.gone()]
                if not jobs:
                    continue
                if key.stream:
                    await self._run_streams(key, jobs)
                else:
                    await self._run_answers(key, jobs)

    async def _gather(self) -> list[Job]:
        """The next job, and those that arrive within wait_ms of it (at most batch_size in all)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.batch_size:
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
            except asyncio.TimeoutError:
                break
        return batch

    async def _on_worker(self, jobs: list[Job], run: Callable[[], list]) -> list[Any]:
        """run() on the model's thread; an exception becomes every job's result."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, run)
        except Exception as exc:  # surfaced to each waiting request
            return [exc] * len(jobs)

    async def _run_answers(self, key: BatchKey, jobs: list[Job]) -> None:
        results = await self._on_worker(jobs, partial(self.answer_fn, [j.messages for j in jobs],
                                                      [j.passages for j in jobs], key.max_tokens, key.temperature,
                                                      key.top_p, len(jobs), key.stops,
                                                      expected=[j.expected for j in jobs]))
        for job, result in zip(jobs, results):
            if job.future.done():  # the client went away meanwhile
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    async def _run_streams(self, key: BatchKey, jobs: list[Job]) -> None:
        infos = await self._on_worker(jobs, partial(self.stream_fn, [j.messages for j in jobs], key.max_tokens,
                                                    key.temperature, key.top_p, [j.cancel for j in jobs],
                                                    [j.emit for j in jobs]))
        for job, info in zip(jobs, infos):
            job.pieces.put_nowait(("error", info) if isinstance(info, Exception) else ("end", info))
