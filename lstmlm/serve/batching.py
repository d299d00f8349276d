"""Continuous batching: the generations of one model and checkpoint step together, one step a
character for every row, in one thread per batch.

A request is primed alone — its prefix read at batch 1 from the state after the run's prime
(read once a model), as `lstmlm generate` reads them (`generate.prime`) — and waits in the
queue until its batch has a place;
it joins between two calls of the batch's steps. Each row samples with its own settings and its
own random stream (`choosing.Rows`), and the compiled step gives a row the same bits whatever
the batch around it (`stepper.py`), so a request streams the characters `lstmlm generate`
prints for the same prefix, options and --seed, whoever else is in the batch. A row leaves when
it has made its length (a call never takes a row past it), or after the call that runs when its
request lets go of it (a stop string, the deadline, its client gone: `Row.cancel`).

Rows leave rather than stay masked: a masked row costs a whole row of every later step, where
removing it copies the rows left once (`Stepper.keep`). Measured (benchmarks/bench_generate.py
--leave, the d2l model, a 2-core AMD EPYC without avx512_bf16): a batch of 64 with 32 ended,
stepped masked, 0.39 ms a step; the 32 left, 0.17 ms, after one keep of 0.19 ms — so removal
pays from the second step on.

A model's rows are spread over `lanes` batches, each stepping in a thread of its own on one core
(the step lets go of the interpreter's lock while it computes), so two cores step two batches at
once where a step of both cores would wake the second core's sleeping thread twice a step. A
request joins the lane with a place free and the fewest rows; the lanes share out the model's
`max_batch` places. Where none is free it waits, and the first lane of its model to free a place
takes it (`Batches.joining`).

A batch makes several characters a call (`Stepper.sample`): between calls its thread takes
the interpreter's lock for the rows' comings and goings and their characters. Taken a character
at a time, the lock was waited for, each time, behind the thread that writes the streams. A call
makes as many steps as take about CALL_S (`steps_per_call`), from STEPS to a block of draws: a
call's own cost (~0.1-0.2 ms) is a small share of 64 rows' 16 steps, but at one row 16 steps
take 0.3 ms and the cost was a third of the time.

A checkpoint that training replaces gets batches of its own (the cache hands out the new model):
the batches of the old one finish their rows on it, and new requests join the new ones.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..choosing import BLOCK, Rows
from ..data.workers import cores
from ..errors import ServeError
from ..generate import Continuation, Sampling, Step, alone, prime, read
from ..inference import Generation, as_generation, read_prefix, read_stops

if TYPE_CHECKING:
    from ..cells.base import State
    from ..stepper import LoopStepper, Stepper
    from .catalog import Loaded


POLL = 0.005  # seconds between a request's looks for characters that have not come yet
STEPS = 16  # the fewest characters a batch makes in one call, between its rows' comings and goings
CALL_S = 0.003  # seconds a call aims at: a row joins or leaves within a few milliseconds


class QueueFull(ServeError):
    """More requests wait for a place than the queue holds."""


class Row:
    """One request's place in a batch: its primed state until it joins, then the characters the
    batch makes for it, which the request reads when it looks.

    The batch's thread extends (a list's extend is atomic in Python) and never wakes anyone;
    the request looks every few milliseconds (app.py). Waking a thread a row a step, each to
    take one character, cost more than the step: at 64 rows, 64 lock-and-notify a step and 64
    threads contending for the interpreter."""

    def __init__(self, sampling: Sampling, stepper: Stepper | LoopStepper, first: torch.Tensor) -> None:
        self.sampling, self.stepper, self.first = sampling, stepper, first
        self.length = sampling.length
        self.tokens: list[Step] = []  # what the batch has made for the row, a step each (`generate.alone`: shared)
        self.read = 0  # how many of them the request has read
        self.done = sampling.length == 0  # no more characters will come (made all, or let go)
        self.failed: str | None = None  # why its batch failed, where it did (set before done)
        self.batch: Batch | None = None  # the batch it waits for, or steps in

    def put(self, tokens: list[tuple[str]]) -> None:
        """From the batch: the row's next characters; done once it has made its length."""
        self.tokens.extend(tokens)
        if len(self.tokens) >= self.length:
            self.done = True  # after the extend: a reader that sees done sees the last character too

    def cancel(self) -> None:
        """The request lets go: the batch drops the row after the call it is in."""
        self.done = True

    def unread(self) -> int:
        """The characters made that the request has not read yet."""
        return len(self.tokens) - self.read

    def finished(self) -> bool:
        """Whether the row has ended and the request has read all it made."""
        return self.done and self.read == len(self.tokens)  # done first: it is set after the last extend

    def chunks(self) -> Iterator[list[Step]]:
        """The row's characters as `generate.Continuation` reads them: all that have come, one
        chunk a look (read them where `unread` says they have come, and nothing waits); a row
        whose request closes it is let go."""
        handed = 0
        try:
            while True:
                made = len(self.tokens)
                if handed < made:
                    yield self.tokens[handed:made]
                    handed = made
                elif self.done:
                    if handed == len(self.tokens):  # looked again: done is set after the last extend
                        return
                else:
                    time.sleep(POLL)
        finally:
            self.cancel()


def lanes_for(device: str) -> int:
    """The lanes a model's rows are spread over by default: a core each on a CPU, one on a GPU."""
    return cores() if device == "cpu" else 1


class Batch:
    """Rows of one model and checkpoint (one of its lanes), stepped together by a thread that
    runs while it has rows; at most `places` of them."""

    def __init__(self, loaded: Loaded, batches: Batches, lane: int, places: int) -> None:
        self.loaded, self.batches, self.lane, self.places = loaded, batches, lane, places
        self.waiting: deque[Row] = deque()  # primed, not joined yet (under batches.lock)
        self.rows: list[Row] = []  # stepping (the batch's thread alone changes it)
        self.thread: threading.Thread | None = None

    def crowd(self) -> tuple[bool, int]:
        """How taken the batch is (under batches.lock): whether its places are all taken, and its
        rows (a place free) or the requests waiting past its places (none free)."""
        taken = len(self.rows) + len(self.waiting)
        return (True, taken - self.places) if taken >= self.places else (False, taken)

    def start(self) -> None:
        """Run the thread unless it runs (under batches.lock)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"batch-{self.loaded.trained.store.name}", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        failed: str | None = "the server stopped"
        try:
            with torch.inference_mode():
                self._steps()
            failed = None
        except Exception as e:  # the rows' requests end with an error (not as if made whole), the log says it in one line
            logging.getLogger("uvicorn.error").error("a batch of run %s failed: %s: %s", self.loaded.trained.store.name, type(e).__name__, e)
            failed = f"internal error ({type(e).__name__}): the generation's batch failed; the server's log says more"
        finally:
            with self.batches.lock:
                self.thread = None
                for row in [*self.rows, *(self.waiting if failed else ())]:  # after a failure: their requests end
                    row.failed = row.failed or failed  # before done: a reader that sees done sees why
                    row.cancel()
                if failed:
                    self.batches.queued -= len(self.waiting)
                    self.waiting.clear()
                self.rows = []
                self.batches.ended(self)

    def _steps(self) -> None:
        step_of = alone(self.loaded.trained.vocab.tokens)  # token id -> its step, shared by every row
        step: Stepper | LoopStepper | None = None
        device = self.loaded.trained.model.W_hq.device
        rows, X = Rows(device), torch.empty(0, dtype=torch.long)
        steps = STEPS
        while True:
            staying = [i for i, row in enumerate(self.rows) if not row.done]
            leaving = len(staying) < len(self.rows)
            with self.batches.lock:  # the rows change under the lock, so /api/status counts them as they are
                joining = self.batches.joining(self, self.places - len(staying))
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
            n = min(steps, *(row.length - len(row.tokens) for row in self.rows))  # no row past its length
            began = time.perf_counter()
            chosen = step.sample(X, n, rows)
            steps = steps_per_call(time.perf_counter() - began, n)
            X = chosen[-1]
            for row, ids in zip(self.rows, chosen.T.tolist()):
                row.put([step_of[i] for i in ids])


def steps_per_call(seconds: float, steps: int) -> int:
    """The steps the next call makes, where the last made `steps` in `seconds`: about CALL_S
    worth, from STEPS to BLOCK (a chunk's most, `choosing.Rows.settings`)."""
    return max(STEPS, min(BLOCK, int(CALL_S * steps / max(seconds, 1e-9))))


class Batches:
    """The running batches, up to `lanes` per model and checkpoint, and their admission: at
    most `max_batch` rows of a model step at once (the lanes share them out), at most `queue`
    requests wait for a place (more are refused at once: `QueueFull`)."""

    def __init__(self, max_batch: int, queue: int, lanes: int = 1) -> None:
        self.max_batch, self.queue = max_batch, queue
        share, more = divmod(max_batch, lanes)
        self.places = [share + (lane < more) for lane in range(min(lanes, max_batch))]  # each lane's places
        self.lock = threading.Lock()
        self.batches: dict[tuple[int, int], Batch] = {}  # by the Loaded's identity (a new checkpoint is a new Loaded) and lane
        self.queued = 0  # admitted, not stepping yet (priming, or waiting for a place)
        self.priming: dict[int, int] = {}  # by the Loaded's identity: admitted, not in a batch yet
        self.making = threading.Lock()  # held to make a template
        self.templates: weakref.WeakKeyDictionary[Loaded, Stepper | LoopStepper] = weakref.WeakKeyDictionary()  # per model: see `template`
        self.contexts: weakref.WeakKeyDictionary[Loaded, tuple[str, State]] = weakref.WeakKeyDictionary()  # per model: see `context_state`

    def admit(self, loaded: Loaded) -> None:
        """Count a request for `loaded` in the queue, or refuse it: where every place of its model
        is taken (rows stepping, waiting to join, or priming) and `queue` requests wait already."""
        with self.lock:
            waiting = self._waiting()
            if self._taken(id(loaded)) >= self.max_batch and waiting >= self.queue:
                raise QueueFull(f"busy: {waiting} requests wait for a place, as many as this server queues; try again shortly")
            self.queued += 1
            self.priming[id(loaded)] = self.priming.get(id(loaded), 0) + 1

    def _taken(self, model: int) -> int:
        """The places of a model (by its Loaded's identity) taken, or asked for by a request priming (under the lock)."""
        batches = (self.batches.get((model, lane)) for lane in range(len(self.places)))
        return self.priming.get(model, 0) + sum(len(b.rows) + len(b.waiting) for b in batches if b is not None)

    def _waiting(self) -> int:
        """The requests past their model's places: those that wait for one (under the lock)."""
        models = {model for model, _ in self.batches} | set(self.priming)
        return sum(max(0, self._taken(model) - self.max_batch) for model in models)

    def _primed(self, loaded: Loaded) -> None:
        """A request for `loaded` is no longer priming (under the lock)."""
        left = self.priming[id(loaded)] - 1
        if left:
            self.priming[id(loaded)] = left
        else:
            del self.priming[id(loaded)]

    def submit(self, loaded: Loaded, prefix: str, sampling: Sampling, context: str) -> tuple[Generation, Row]:
        """A request's continuation, once admitted: primed here (the caller's thread), then
        queued for its batch. The Generation's steps come as the batch makes them."""
        trained = loaded.trained
        try:
            text, stop = read_prefix(trained, prefix), read_stops(trained, sampling).stop
            like = self.template(loaded)
            stepper, first = prime(trained.model, trained.vocab, text, 1, loaded.precision, self.context_state(loaded, context), like)
        except BaseException:
            with self.lock:
                self.queued -= 1
                self._primed(loaded)
            raise
        row = Row(sampling, stepper, first)
        generation = as_generation(trained, prefix, text, Continuation(row.chunks(), stop, 1))
        with self.lock:
            self._primed(loaded)
            if row.done:  # length 0: nothing to make
                self.queued -= 1
                return generation, row
            batch = row.batch = self._lane(loaded)
            batch.waiting.append(row)
            batch.start()
        return generation, row

    def joining(self, batch: Batch, free: int) -> list[Row]:
        """Up to `free` rows to join `batch` (under the lock): those waiting for it, then those
        waiting for its model's other lanes past their places (all full when they came), so
        that a place freed in any lane goes to a request that waits, not only to those that
        chose that lane."""
        rows = [batch.waiting.popleft() for _ in range(min(len(batch.waiting), free))]
        for lane in range(len(self.places)):
            other = self.batches.get((id(batch.loaded), lane))
            if other is None or other is batch:
                continue
            past = len(other.waiting) - max(0, other.places - len(other.rows))  # those it has no place for
            for _ in range(min(past, free - len(rows))):
                row = other.waiting.popleft()
                row.batch = batch
                rows.append(row)
        self.queued -= len(rows)
        return rows

    def let_go(self, row: Row) -> None:
        """A request lets go of its row: one still waiting for a place leaves the queue at once
        (its place there comes back), one stepping leaves its batch after the call it is in."""
        with self.lock:
            row.cancel()
            if row.batch is not None and row in row.batch.waiting:
                row.batch.waiting.remove(row)
                self.queued -= 1

    def _lane(self, loaded: Loaded) -> Batch:
        """The batch a new row of `loaded` waits for (under the lock): of its lanes with a place
        free, the one with the fewest rows (the cores share the work), else the one with the
        fewest waiting; the first of those on a tie."""
        lanes = [self.batches.get((id(loaded), lane)) or Batch(loaded, self, lane, places) for lane, places in enumerate(self.places)]
        batch = min(lanes, key=Batch.crowd)
        self.batches[(id(loaded), batch.lane)] = batch
        return batch

    def ready(self, loaded: Loaded, context: str) -> bool:
        """Whether `loaded`'s template and the state after `context` are made: a request's row
        then costs only its prefix's reading, and `submit` takes no lock that making holds."""
        held = self.contexts.get(loaded)
        return loaded in self.templates and (not context or (held is not None and held[0] == context))

    def template(self, loaded: Loaded) -> Stepper | LoopStepper:
        """A stepper of `loaded`'s model whose weights every request's row shares: made once a
        model (a few milliseconds, longer than priming a short prefix), kept as long as the model.
        Once made it is taken without the lock, which another model's making may hold a while."""
        made = self.templates.get(loaded)
        if made is not None:
            return made
        with self.making:  # concurrent first requests make it once
            made = self.templates.get(loaded)
            if made is None:
                trained = loaded.trained
                made = self.templates[loaded] = prime(trained.model, trained.vocab, trained.vocab.tokens[:1], 1, loaded.precision)[0]
            return made

    def context_state(self, loaded: Loaded, context: str) -> State | None:
        """The state after reading `context` (the run's prime, or nothing: None, zeros) as
        `lstmlm generate` reads it, on its own before the prefix: read once a model, where each
        request reading it again cost a forward over its few hundred characters (on the
        Shakespeare 1×768 model, most of what 64 requests at once waited for)."""
        if not context:
            return None
        held = self.contexts.get(loaded)
        if held is not None and held[0] == context:  # read already: no lock (see `template`)
            return held[1]
        with self.making:
            held = self.contexts.get(loaded)
            if held is None or held[0] != context:
                trained = loaded.trained
                held = self.contexts[loaded] = (context, read(trained.model, trained.vocab, context, trained.model.begin_state(1), loaded.precision))
            return held[1]

    def ended(self, batch: Batch) -> None:
        """A batch's thread ends (under the lock): forget it, or run it again for rows that came meanwhile."""
        if batch.waiting:
            batch.start()
        elif self.batches.get((id(batch.loaded), batch.lane)) is batch:
            del self.batches[(id(batch.loaded), batch.lane)]

    def status(self) -> dict[str, int]:
        with self.lock:
            running = sum(1 for batch in self.batches.values() for row in batch.rows if not row.done)  # let go: no longer running
            return {"running": running, "queued": self.queued, "batches": len(self.batches)}
