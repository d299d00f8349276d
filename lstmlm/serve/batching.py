"""Continuous batching: the generations of one model and checkpoint step together, one step a
character for every row, in one thread per batch.

A request is primed alone — the prime and its prefix read by the model's forward at batch 1,
exactly as `lstmlm generate` reads them — and waits in the queue until its batch has a place;
it joins at the next step boundary. Each row samples with its own settings and its own random
stream (`sampling.Rows`), and the compiled step gives a row the same bits whatever the batch
around it (`stepper.py`), so a request streams the characters `lstmlm generate` prints for the
same prefix, options and --seed, whoever else is in the batch. A row leaves when it has made
its length, or at the next step once its request lets go of it (a stop string, the deadline,
its client gone: `Row.cancel`).

Rows leave rather than stay masked: a masked row costs a whole row of every later step, where
removing it copies the rows left once (`Stepper.keep`). Measured (benchmarks/bench_generate.py
--leave, the d2l model, a 2-core AMD EPYC without avx512_bf16): a batch of 64 with 32 ended,
stepped masked, 0.39 ms a step; the 32 left, 0.17 ms, after one keep of 0.19 ms — so removal
pays from the second step on.

A checkpoint that training replaces gets a batch of its own (the cache hands out the new model):
the batch of the old one finishes its rows on it, and new requests join the new one.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..choosing import Rows
from ..errors import ServeError
from ..generate import Continuation, Sampling, prime
from ..inference import Generation, as_generation, read_prefix

if TYPE_CHECKING:
    from ..stepper import LoopStepper, Stepper
    from .catalog import Loaded


POLL = 0.005  # seconds between a request's looks for characters that have not come yet


class QueueFull(ServeError):
    """More requests wait for a place than the queue holds."""


class Row:
    """One request's place in a batch: its primed state until it joins, then the characters the
    batch makes for it, which the request reads when it looks.

    The batch's thread appends (an append to a list is atomic in Python) and never wakes anyone;
    the request looks every few milliseconds (app.py). Waking a thread a row a step, each to
    take one character, cost more than the step: at 64 rows, 64 lock-and-notify a step and 64
    threads contending for the interpreter."""

    def __init__(self, sampling: Sampling, stepper: Stepper | LoopStepper, first: torch.Tensor) -> None:
        self.sampling, self.stepper, self.first = sampling, stepper, first
        self.length = sampling.length
        self.tokens: list[str] = []  # what the batch has made for the row
        self.read = 0  # how many of them the request has read
        self.done = sampling.length == 0  # no more characters will come (made all, or let go)

    def put(self, token: str) -> None:
        """From the batch: the row's next character; done once it has made its length."""
        self.tokens.append(token)
        if len(self.tokens) >= self.length:
            self.done = True  # after the append: a reader that sees done sees the last character too

    def cancel(self) -> None:
        """The request lets go: the batch drops the row at its next step."""
        self.done = True

    def unread(self) -> int:
        """The characters made that the request has not read yet."""
        return len(self.tokens) - self.read

    def finished(self) -> bool:
        """Whether the row has ended and the request has read all it made."""
        return self.done and self.read == len(self.tokens)  # done first: it is set after the last append

    def chunks(self) -> Iterator[list[list[str]]]:
        """The row's characters as `generate.Continuation` reads them: all that have come, one
        chunk a look (read them where `unread` says they have come, and nothing waits); a row
        whose request closes it is let go."""
        handed = 0
        try:
            while True:
                made = len(self.tokens)
                if handed < made:
                    yield [[token] for token in self.tokens[handed:made]]
                    handed = made
                elif self.done:
                    if handed == len(self.tokens):  # looked again: done is set after the last append
                        return
                else:
                    time.sleep(POLL)
        finally:
            self.cancel()


class Batch:
    """The rows of one model and checkpoint, stepped together by a thread that runs while it has rows."""

    def __init__(self, loaded: Loaded, batches: Batches) -> None:
        self.loaded, self.batches = loaded, batches
        self.waiting: deque[Row] = deque()  # primed, not joined yet (under batches.lock)
        self.rows: list[Row] = []  # stepping (the batch's thread alone changes it)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the thread unless it runs (under batches.lock)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"batch-{self.loaded.trained.store.name}", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        failed = True
        try:
            with torch.inference_mode():
                self._steps()
            failed = False
        finally:
            with self.batches.lock:
                self.thread = None
                for row in [*self.rows, *(self.waiting if failed else ())]:  # after a failure: their requests end
                    row.cancel()
                if failed:
                    self.batches.queued -= len(self.waiting)
                    self.waiting.clear()
                self.rows = []
                self.batches.ended(self)

    def _steps(self) -> None:
        tokens = self.loaded.trained.vocab.tokens
        step: Stepper | LoopStepper | None = None
        device = self.loaded.trained.model.W_hq.device
        rows, X = Rows(device), torch.empty(0, dtype=torch.long)
        while True:
            staying = [i for i, row in enumerate(self.rows) if not row.done]
            leaving = len(staying) < len(self.rows)
            with self.batches.lock:  # the rows change under the lock, so /api/status counts them as they are
                joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.batches.max_batch - len(staying)))]
                self.batches.queued -= len(joining)
                if not staying and not joining:
                    self.rows = []
                    return  # _run ends the batch, or runs it again for a row that comes meanwhile
                self.rows = [self.rows[i] for i in staying] + joining
            if leaving and staying:
                assert step is not None
                step.keep(staying)
                rows.keep(staying)
                X = X[staying]
            fresh = not staying  # no row stays: the first to join starts the batch's stepper
            for row in joining:
                if fresh:
                    step, X, rows, fresh = row.stepper, row.first, Rows(device), False
                else:
                    assert step is not None  # a batch with rows staying has their stepper
                    step.extend(row.stepper)  # type: ignore[arg-type]  # the same model's stepper, of the same kind
                    X = torch.cat([X, row.first])
                rows.add(row.sampling)
            assert step is not None
            X = rows.choose(step(X))
            for row, i in zip(self.rows, X.tolist()):
                row.put(tokens[i])


class Batches:
    """The running batches, one per model and checkpoint, and their admission: at most
    `max_batch` rows step in a batch, at most `queue` requests wait for a place (more are
    refused at once: `QueueFull`)."""

    def __init__(self, max_batch: int, queue: int) -> None:
        self.max_batch, self.queue = max_batch, queue
        self.lock = threading.Lock()
        self.batches: dict[int, Batch] = {}  # by the Loaded's identity: a new checkpoint is a new Loaded
        self.queued = 0  # admitted, not stepping yet (priming, or waiting for a place)
        self.making = threading.Lock()  # held to make a template
        self.templates: weakref.WeakKeyDictionary[Loaded, Stepper | LoopStepper] = weakref.WeakKeyDictionary()  # per model: see `template`

    def admit(self) -> None:
        """Count a request in the queue, or refuse it."""
        with self.lock:
            if self.queued >= self.queue:
                raise QueueFull(f"busy: {self.queued} requests wait for a place, as many as this server queues; try again shortly")
            self.queued += 1

    def submit(self, loaded: Loaded, prefix: str, sampling: Sampling, context: str) -> tuple[Generation, Row]:
        """A request's continuation, once admitted: primed here (the caller's thread), then
        queued for its batch. The Generation's steps come as the batch makes them."""
        trained = loaded.trained
        try:
            text = read_prefix(trained, prefix)
            like = self.template(loaded)
            stepper, first = prime(trained.model, trained.vocab, [*context, *text], 1, loaded.precision, like=like)
        except BaseException:
            with self.lock:
                self.queued -= 1
            raise
        row = Row(sampling, stepper, first)
        generation = as_generation(trained, prefix, text, Continuation(row.chunks(), sampling.stop, 1))
        with self.lock:
            if row.done:  # length 0: nothing to make
                self.queued -= 1
                return generation, row
            batch = self.batches.setdefault(id(loaded), Batch(loaded, self))
            batch.waiting.append(row)
            batch.start()
        return generation, row

    def template(self, loaded: Loaded) -> Stepper | LoopStepper:
        """A stepper of `loaded`'s model whose weights every request's row shares: made once a
        model (a few milliseconds, longer than priming a short prefix), kept as long as the model."""
        with self.making:  # concurrent first requests make it once
            made = self.templates.get(loaded)
            if made is None:
                trained = loaded.trained
                made = self.templates[loaded] = prime(trained.model, trained.vocab, trained.vocab.tokens[:1], 1, loaded.precision)[0]
            return made

    def ended(self, batch: Batch) -> None:
        """A batch's thread ends (under the lock): forget it, or run it again for rows that came meanwhile."""
        if batch.waiting:
            batch.start()
        elif self.batches.get(id(batch.loaded)) is batch:
            del self.batches[id(batch.loaded)]

    def status(self) -> dict[str, int]:
        with self.lock:
            running = sum(1 for batch in self.batches.values() for row in batch.rows if not row.done)  # let go: no longer running
            return {"running": running, "queued": self.queued, "batches": len(self.batches)}
