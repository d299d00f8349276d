"""Text from a trained model: prime the state on the prefix, then one step per character.

The steps run on a `Stepper` (stepper.py), the model rebuilt for inference one character at a
time; each step's characters are chosen by `choosing.Rows`, every row with its own settings and
random stream. Stop strings end a sample where one first appears (`Continuation`), around the
per-step stream: the steps themselves never see them. The server's continuous batching
(serve/batching.py) runs the same pieces, its rows primed by `prime` as a sample is here.

Generation also owns its context: the prefixes training samples from, and the "prime" — the
end of the training text that generation reads before a prefix (see `prime_text`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence

import torch

from .cells.base import State
from .choosing import Rows, choose_next
from .data.text import normalize
from .device import DTYPES, autocast, resolve_precision
from .errors import VocabError
from .model import CharLM
from .sampling import SAMPLE_LENGTH, Sampling
from .stepper import LoopStepper, Stepper, stepper, steps_compiled
from .vocab import Vocab, describe_chars

__all__ = ["SAMPLE_LENGTH", "LoopStepper", "Rows", "Sampling", "Stepper", "choose_next", "stepper"]  # what generation offers from its parts

PRIME_CHARS = 256  # at most this much training text is kept to read before a prefix

Step = Sequence[str]  # one step of a generation: the text each sample adds


# ---- context --------------------------------------------------------------------------------


def prepare_prefix(prefix: str, vocab: Vocab, mode: str) -> str:
    """The prefix as the model can read it: d2l-normalized for a d2l model; checked for a raw one."""
    if mode == "d2l":
        prefix = normalize(prefix, "d2l")
    if not prefix:
        raise VocabError("the prefix is empty" + (" after d2l normalization" if mode == "d2l" else ""))
    unknown = vocab.unknown_chars(prefix)
    if unknown:
        raise VocabError(f"prefix characters outside the model's vocabulary: {describe_chars(unknown)}")
    return prefix


def prime_text(vocab: Vocab, train: torch.Tensor, mode: str) -> str:
    """Context for generation to read before a prefix: the training text up to its last
    paragraph break ("\n\n"), from a line start at most PRIME_CHARS back.

    Trained with the state carried from batch to batch, a model has met a zero state only at
    the start of each epoch, and from one it can be lost for a while ("ROMEO:" → "XVVVV…");
    after reading some of its own kind of text it is where training left it. Empty in d2l
    mode (the seed's predict starts from zeros, and its lines are joined) and where the last
    20·PRIME_CHARS characters of the training text hold no paragraph break."""
    if mode == "d2l":
        return ""
    tail = vocab.decode(train[-20 * PRIME_CHARS :])
    end = tail.rfind("\n\n") + 2
    if end < 2:
        return ""
    start = tail.find("\n", max(0, end - PRIME_CHARS), end - 2) + 1  # after a line break (0: none found)
    return tail[start:end] if start > 0 else tail[max(0, end - PRIME_CHARS) : end]


# ---- the steps ----------------------------------------------------------------------------------


CHUNK = 32  # characters made per resumption of the inner generator
READ_BY_STEPS = 16  # tokens `prime` reads a step each, where a forward over them would cost more
MOST_GREEDY = 1024  # a greedy chunk doubles from CHUNK up to this while each takes under GROW_S
GROW_S = 0.01  # seconds: text still shows at least this often, and a fast model makes few calls


def step_dtype(precision: str, model: CharLM, num_samples: int) -> torch.dtype:
    """The dtype of the Stepper's products: the precision's, but fp32 for one sample on a CPU
    where the step is not compiled. There a step is a row-vector product, bound by reading the
    weights, and torch's bf16 kernel runs it at half the fp32 rate (measured on an AVX-512 EPYC:
    30,000 against 60,000 characters/s for the d2l model), so bf16 would only be less exact. The
    compiled step reads half the bytes in bf16 and widens them cheaply (csrc/recurrence.cpp,
    `pack`): there bf16 is the faster at one sample."""
    if num_samples == 1 and model.W_hq.device.type == "cpu" and not steps_compiled(model):
        return torch.float32
    return DTYPES[precision]


def ids_on_host(device: torch.device, num_samples: int) -> bool:
    """Whether each step's chosen ids come back to the host as Python ints: for one sample on a
    CPU, where an int is the cheapest input (a row view) and decoding needs it anyway. On a GPU
    that would wait for the device at every character: there the ids stay on the device and a
    chunk of them comes back at once."""
    return num_samples == 1 and device.type == "cpu"


def generate(
    model: CharLM,
    vocab: Vocab,
    prefix: str,
    sampling: Sampling = Sampling(),
    prime: str | Sequence[str] = "",
    precision: str = "fp32",
    state: State | None = None,
) -> Continuation:
    """Per step, the next character of each of `sampling.num_samples` continuations of
    `prefix`, the state having read `prime` first, in a forward of its own (context that is not
    part of the output; see `prime_text`; the server reads it once for all its requests): a text, or a list of tokens (what `Continuation.tokens` holds, where a
    generated "<unk>" is one token), from `state` (default zeros; `read` gives one). The
    products run in `precision` ("fp32" or "bf16"). With
    stop strings, see `Continuation` for what a step holds.

    The characters are made `CHUNK` at a time: torch re-enters inference mode on every
    resumption of a decorated generator, which at a character's cost of ~0.1 ms is worth
    avoiding; a chunk still streams within a few milliseconds.

    A `prime` or `prefix` outside the vocabulary is a VocabError, a precision other than fp32,
    bf16 or auto (this device's choice) a DeviceError, here rather than at the first step."""
    unknown = [token for token in prime if token not in vocab.index]
    if unknown:
        raise VocabError(f"context outside the model's vocabulary: {describe_chars(unknown)}")
    if vocab.unknown_chars(prefix):
        raise VocabError(f"prefix characters outside the model's vocabulary: {describe_chars(vocab.unknown_chars(prefix))}")
    precision = resolve_precision(precision, model.W_hq.device)
    chunks = _generate_chunks(model, vocab, prime, prefix, sampling, precision, state)
    return Continuation(chunks, sampling.stop, sampling.num_samples)


@torch.inference_mode()
def prime(
    model: CharLM,
    vocab: Vocab,
    context: Sequence[str],
    rows: int = 1,
    precision: str = "fp32",
    state: State | None = None,
    like: Stepper | LoopStepper | None = None,
) -> tuple[Stepper | LoopStepper, torch.Tensor]:
    """A stepper of `rows` rows that have read `context` (tokens) but its last, from `state`
    (default: zeros; one row, which every row starts from, or `rows`), and that last token's
    ids (rows,): what the first step reads. `like`: a stepper of this model, rows and precision
    whose weights the new one shares.

    Up to READ_BY_STEPS tokens are read by the stepper itself, a step each, the rest by the
    model's forward over them all (`read`): the forward's fixed cost (its compiled sequence
    sets up for training, ~0.25 ms on the d2l model) outweighs a short prefix's steps (~20 µs
    each), and a server reads a prefix per request. A forward from one row's state reads for one
    row, then every row takes its copy: the rows read the same tokens, and a forward's products
    may round otherwise at another batch, where each row must be what it is alone."""
    device = model.W_hq.device
    ids = [vocab.index[token] for token in context]
    last = torch.tensor(ids[-1:], device=device).repeat(rows)  # (rows,)
    state = state if state is not None else model.begin_state(1)
    if len(ids) - 1 > READ_BY_STEPS:
        state, ids = read(model, vocab, context[:-1], state, precision), ids[-1:]
    state = as_rows(state, rows)
    step = like.with_state(state) if like is not None else stepper(model, state, step_dtype(precision, model, rows))
    for i in ids[:-1]:
        step([i] if rows == 1 else torch.full((rows,), i, device=device))  # one row: a list, the cheapest input
    return step, last


def as_rows(state: State, rows: int) -> State:
    """`state` (each (layers, 1 or rows, hiddens)) with `rows` rows: a single row copied to each."""
    return tuple(t.expand(-1, rows, -1).contiguous() if t.shape[1] != rows else t for t in state)


@torch.inference_mode()
def read(model: CharLM, vocab: Vocab, tokens: Sequence[str], state: State, precision: str = "fp32") -> State:
    """The state after reading `tokens` from `state`, all at once by the model's forward (one
    state row a batch row, each reading the same tokens)."""
    if not tokens:
        return state
    device = model.W_hq.device
    ids = torch.tensor([vocab.index[c] for c in tokens], device=device).repeat(state[0].shape[1], 1)  # (rows, len)
    with autocast(device, precision):
        after: State = model(ids, state)[1]
    return after


@torch.inference_mode()
def _generate_chunks(
    model: CharLM, vocab: Vocab, context: str | Sequence[str], prefix: str, sampling: Sampling, precision: str, state: State | None
) -> Iterator[list[Step]]:
    """`generate`'s characters, CHUNK steps at a time, after reading `context` then `prefix`."""
    samples, device = sampling.num_samples, model.W_hq.device
    tokens = [*context, *prefix]
    before = list(context)[: len(tokens) - 1]  # the context, read on its own, but the last token: the first step reads it
    state = read(model, vocab, before, state if state is not None else model.begin_state(1), precision)  # once for every sample
    step, last = prime(model, vocab, tokens[len(before) :], samples, precision, state)
    rows = Rows(device)
    rows.add(sampling, samples)
    tokens, alone_steps, length = vocab.tokens, alone(vocab.tokens), sampling.length
    if ids_on_host(device, samples) and sampling.greedy:  # d2l's predict, a chunk at a time
        X, size, start = last.tolist(), CHUNK, 0
        while start < length:
            began = time.perf_counter()
            made = step.greedy(X, min(size, length - start))
            size = 2 * size if time.perf_counter() - began < GROW_S and size < MOST_GREEDY else size
            start, X = start + len(made), made[-1].tolist()
            yield decoded(made, tokens, alone_steps)
        return
    previous = last
    for start in range(0, length, CHUNK):
        chosen = step.sample(previous, min(CHUNK, length - start), rows)  # a chunk's ids, decoded at once
        previous = chosen[-1]
        yield decoded(chosen, tokens, alone_steps)


def alone(tokens: Sequence[str]) -> list[tuple[str]]:
    """Each token as the step of one sample that makes it. One sample's steps are these, shared,
    so a character makes no object: the server's streams each held a list a character, tens of
    thousands in all, which the cyclic collector went through again and again."""
    return [(token,) for token in tokens]


def decoded(chosen: torch.Tensor, tokens: Sequence[str], steps: Sequence[tuple[str]]) -> list[Step]:
    """A chunk's ids (steps, rows) as its steps: `steps[i]` (`alone`) for token i where there is
    one row, read as one flat list (a list of one id a step and a comprehension over each took
    0.26 µs a character against 0.08, beside a greedy step's ~11 µs); a list a step for several."""
    if chosen.shape[1] == 1:
        return [steps[i] for i in chosen.view(-1).tolist()]
    return [[tokens[i] for i in row] for row in chosen.tolist()]


class Continuation(Iterator[Step]):
    """The steps of `generate`: per step, the text each sample adds.

    Without stop strings that is one character each. With them, each sample ends at the first
    occurrence of any of them in its continuation, the stop string left out: characters that
    could be the start of one are held back (a step adds "") until the next ones show they are
    not (then that step adds them all); an ended sample adds "". The steps end when every
    sample has ended (the model stops working) or after `sampling.length` characters, and
    `ended[i]` is the stop string that ended sample i (None: it ran to its length).
    `tokens[i]` is what the model wrote for sample i, stop string and held-back text included:
    reading them back puts a model where this sample left it.
    """

    def __init__(self, chunks: Iterator[list[Step]], stop: tuple[str, ...], num_samples: int) -> None:
        self._chunks = chunks
        self.ahead = 0  # steps already made that the next calls return without making any
        self._steps: Iterator[Step] = self._flat(chunks)
        self.stop = stop
        self.ended: list[str | None] = [None] * num_samples
        self._held = [""] * num_samples  # per sample: text that may begin a stop string
        self._added: list[Step] = []  # per step: what each sample added (one list append a step)
        self._written: list[Step] = []  # with stop strings, per step: what the model wrote for each sample
        self._ends: list[int | None] = [None] * num_samples  # per sample: the steps it wrote before it ended
        self._finished = False

    @property
    def text(self) -> list[str]:
        """Per sample, the continuation the steps have added so far."""
        return ["".join(step[i] for step in self._added) for i in range(len(self.ended))]

    @property
    def tokens(self) -> list[list[str]]:
        """Per sample, the tokens the model wrote so far (stop string and held-back text included)."""
        if not self.stop:
            return [[step[i] for step in self._added] for i in range(len(self.ended))]
        return [[step[i] for step in self._written[:end]] for i, end in enumerate(self._ends)]

    def __next__(self) -> Step:
        if self._finished:
            raise StopIteration
        if not self.stop:
            added = next(self._steps)
        elif (chars := next(self._steps, None)) is None:  # the length is reached: what was held back was no stop after all
            self._finished = True
            added, self._held = self._held, [""] * len(self._held)
        else:
            self._written.append(chars)
            added = [self._scan(i, c) for i, c in enumerate(chars)]
            if all(e is not None for e in self.ended):
                self.close()
        self._added.append(added)
        return added

    def _flat(self, chunks: Iterator[list[Step]]) -> Iterator[Step]:
        for chunk in chunks:
            self.ahead = len(chunk)
            for chars in chunk:
                self.ahead -= 1
                yield chars

    def as_made(self) -> Iterator[list[Step]]:
        """The steps in groups, each what was made together (a chunk): a reader that shows text
        as it comes needs no call a character."""
        while made := self.several(1):  # the first of a chunk: this makes it
            yield made + self.several(self.ahead)

    def several(self, n: int) -> list[Step]:
        """The next `n` steps, which the caller knows are made (the server's look at its row):
        without stop strings one slice of the chunks, not a call a step. Fewer where the steps
        end first (every sample stopped)."""
        if self.stop or self._finished:
            return one_by_one(self, n)
        steps = list(itertools.islice(self._steps, n))
        self._added.extend(steps)
        return steps

    def _scan(self, i: int, c: str) -> str:
        """What sample i shows after adding c: text no stop string can begin any more."""
        if self.ended[i] is not None:
            return ""
        held = self._held[i] + c
        found = [(held.find(s), s) for s in self.stop if s in held]
        if found:
            at, s = min(found)  # the earliest occurrence ends the sample
            self.ended[i], self._held[i], self._ends[i] = s, "", len(self._written)
            return held[:at]
        keep = next((k for k in range(len(held)) if any(s.startswith(held[k:]) for s in self.stop)), len(held))
        self._held[i] = held[keep:]
        return held[:keep]

    def end_here(self) -> Step:
        """End the steps where they are, as the length would: what was held back was no stop
        string after all, and is the last step (the server's deadline)."""
        added = [""] * len(self.ended) if self._finished else self._held
        self._held = [""] * len(self.ended)
        self._added.append(added)
        self.close()
        return added

    def close(self) -> None:
        """Stop generating (the model's work ends here); the steps end."""
        self._finished = True
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def one_by_one(steps: Iterator[Step], n: int) -> list[Step]:
    """The next `n` of `steps`, a call each; fewer where they end first."""
    made = []
    for _ in range(n):
        chars = next(steps, None)
        if chars is None:
            break
        made.append(chars)
    return made


def complete(model: CharLM, vocab: Vocab, prefix: str, length: int = SAMPLE_LENGTH, prime: str = "") -> str:
    """The prefix and its greedy continuation as a string, as training's samples show it (the
    model runs in eval mode, then is restored)."""
    was_training = model.training
    model.eval()
    try:
        return prefix + "".join(chars[0] for chars in generate(model, vocab, prefix, Sampling(length=length), prime))
    finally:
        model.train(was_training)
