"""Text from a trained model: prime the state on the prefix once, then one step per character.

The steps run on a `Stepper`, the model rebuilt for inference one character at a time: the
scratch core's stacked weights (converted from torch's for a cudnn model, the same function),
the first layer's input projection folded into a table with one row per character, and every
buffer made once. At batch 1 a step is one (1 × H)·(H × blocks·H) product a layer and the
cell's elementwise part (compiled where the cell has a kernel); going through the training
model's forward, with its checks and fresh tensors, cost four times as long. A cell whose step
is not a product of H_{t-1} then an elementwise part (the GRU's d2l form) steps through the
model's own forward instead (`LoopStepper`).

temperature 0 is the seed's greedy argmax (d2l's predict_ch8); above 0 the next character is
sampled from softmax(logits / temperature), optionally cut to the top-k characters, to the
smallest set whose probability reaches top-p, and to those at least min-p times as likely as
the most likely one (`Sampling`, `choose_next`). Stop strings end a sample where one first
appears (`Continuation`), around the per-step stream: the steps themselves never see them.

Generation also owns its context: the prefixes training samples from, and the "prime" — the
end of the training text that generation reads before a prefix (see `prime_text`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from . import recurrence
from .cells.base import Stacked, State
from .data.text import normalize
from .device import DTYPES, autocast
from .errors import ConfigError, VocabError
from .model import CharLM, convert, packed_layer
from .vocab import Vocab, describe_chars

SAMPLE_LENGTH = 50  # characters per training sample, as d2l
PRIME_CHARS = 256  # at most this much training text is kept to read before a prefix
D2L_PREFIXES = ("time traveller", "traveller")


@dataclass(frozen=True)
class Sampling:
    """How to continue a prefix: `length` characters for each of `num_samples` continuations;
    temperature 0 is greedy, above 0 samples (top-k, top-p and min-p cut the candidates; `seed`
    repeats). A sample ends early at the first of the `stop` strings, which is left out."""

    length: int = SAMPLE_LENGTH
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int | None = None
    min_p: float = 0.0
    stop: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name, value, low, high in (("top_p", self.top_p, 0.0, 1.0), ("min_p", self.min_p, 0.0, 1.0)):
            if not low <= value <= high:
                raise ConfigError(f"{name} must lie in [{low}, {high}], not {value}")
        if self.length < 0 or self.top_k < 0 or self.temperature < 0 or self.num_samples < 1:
            raise ConfigError("length, top_k and temperature must not be negative, and num_samples at least 1")
        if any(not s for s in self.stop):
            raise ConfigError("a stop string must not be empty")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # what torch.Generator takes
            raise ConfigError(f"--seed must be from 0 to 2**64 - 1, not {self.seed}")


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


def sample_prefixes(vocab: Vocab, train: torch.Tensor, mode: str) -> list[str]:
    """What training samples from: d2l's two prefixes where the vocabulary can read them, else
    the training text's first line (at most 16 characters)."""
    fits = [p for p in D2L_PREFIXES if vocab.knows(p)]
    if mode == "d2l" or fits:
        return fits
    first = vocab.decode(train[:64]).split("\n")[0][:16]
    return [first or vocab.decode(train[:8])]


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


# ---- choosing the next character ------------------------------------------------------------


def choose_next(logits: torch.Tensor, sampling: Sampling = Sampling(), generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (batch,) from logits (batch, vocab)."""
    if sampling.temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (batch, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely characters
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # always keeps the most likely
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if sampling.min_p > 0.0:  # Nguyen et al. 2024: p_i < min_p · max_j p_j is cut; the most likely always stays
        floor = sampling.min_p * probs.amax(dim=-1, keepdim=True)  # (batch, 1)
        probs = probs.masked_fill(probs < floor, 0.0)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of `probs` (batch, vocab), drawn with those probabilities: argmax of p / q
    for q ~ Exp(1), the draw torch.multinomial(probs, 1) makes, from the same random numbers —
    without its checks of `probs`, which it reads on the host (on a GPU: a wait per character).
    Here probs is a softmax, cut: finite, non-negative, and positive somewhere."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


# ---- the inference step ---------------------------------------------------------------------


def layer_weights(model: CharLM, dtype: torch.dtype) -> list[Stacked]:
    """Each layer's stacked weights in `dtype`, the first layer's input always as a table with a
    column per id: (X_t W_x + b)ᵀ for one-hot X_t, (E[id] W_x + b)ᵀ with an embedding E."""
    embedding, cell, scratch = model.embedding, model.cell, model.scratch_core
    if scratch is not None:
        weights = [layer.stacked(dtype, ids=(k == 0 and embedding is None)) for k, layer in enumerate(scratch.scratch_layers())]
    else:
        sd = convert(model.state_dict(), "scratch", cell)
        weights = [cell.stack(packed_layer(sd, k, cell), dtype, ids=(k == 0 and embedding is None)) for k in range(model.num_layers)]
    if embedding is not None:
        first = weights[0]
        assert first.W_xT is not None  # an embedding feeds the first layer dense input
        table = torch.addmm(first.b.float()[:, None], first.W_xT.float(), embedding.weight.detach().float().T)  # (blocks·hiddens, vocab)
        weights[0] = first._replace(W_xT=None, table=table.to(first.b.dtype))
    return weights


def everything_that_reads_H(W_in: torch.Tensor, b_in: torch.Tensor, W_h: torch.Tensor, b_h: torch.Tensor | None) -> torch.Tensor:
    """[[W_in, W_h], [b_in, b_h]]: (hiddens + 1, inputs + blocks·hiddens). [H_t, 1] times it is
    [H_t W_in + b_in, H_t W_h + b_h]: the reader's input and this layer's next recurrent term
    (b_h: a bias inside the recurrence, the GRU's b_hh; zero for the others)."""
    top = torch.cat([W_in, W_h], dim=1)
    inner = torch.zeros(W_h.shape[1], dtype=b_in.dtype, device=b_in.device) if b_h is None else b_h.to(b_in.dtype)
    bottom = torch.cat([b_in, inner])[None]
    return torch.cat([top, bottom]).contiguous()


class Stepper:
    """A model's inference one character at a time: `stepper(X_t)` takes a list of `batch` ids
    and returns the logits (batch, vocab) of the next character, advancing the state in place.

    Each layer's H_t is multiplied once, by every matrix that reads it: the next layer's W_x
    (the output layer's W_hq on top) and its own W_h for step t + 1, side by side in one
    product, the biases in a last row that a constant 1 after H_t picks up. At batch 1 that is
    one product a layer per character. The returned logits are a view that the next step
    overwrites. Dropout is never applied: this is inference. The products run in `dtype` (bf16
    as training's under bf16); the cell carries its fp32 state S (the LSTM's C; H itself for
    the others) beside H.
    """

    def __init__(self, model: CharLM, state: State, dtype: torch.dtype = torch.float32, compiled: bool | None = None) -> None:
        """`compiled`: step by the cell's compiled kernel; by default where the model's scratch
        core runs compiled, or, for torch's core, where the kernel can run here."""
        self.cell = cell = model.cell
        weights = layer_weights(model, dtype)
        H_0, S_0 = state[0], state[-1]  # (layers, batch, hiddens)
        batch, hiddens = H_0.shape[1], H_0.shape[2]
        assert weights[0].table is not None  # layer_weights always gives the first layer a table
        self.table = weights[0].table.T.to(dtype, copy=True).contiguous()  # (vocab, blocks·hiddens): X_t W_x + b_0 for each id
        self.rows = self.table.unbind(0)  # its rows as views made once: tensor[i] costs microseconds
        readers = [(w.W_xT.T, w.b) for w in weights[1:] if w.W_xT is not None] + [(model.W_hq.detach().to(dtype), model.b_q.detach().to(dtype))]
        self.W: list[torch.Tensor] = []  # per layer: [[W_in, W_h], [b_in, b_h]], (hiddens + 1, inputs of the reader + blocks·hiddens)
        self.H1: list[torch.Tensor] = []  # per layer: [H_t, 1], (batch, hiddens + 1)
        self.P: list[torch.Tensor] = []  # per layer: [H_t W_in + b_in, H_t W_h + b_h], the product's output
        self.S: list[torch.Tensor] = []  # per layer: the fp32 state (batch, hiddens)
        self.outputs: list[torch.Tensor] = []  # per layer: H_t W_in + b_in, a view of P
        self.recurrent: list[torch.Tensor] = []  # per layer: H_t W_h + b_h, a view of P
        for k, (w, (W_in, b_in)) in enumerate(zip(weights, readers)):
            self.W.append(everything_that_reads_H(W_in.to(dtype), b_in.to(dtype), w.W_hT.T, w.b_h))
            H1 = torch.ones(batch, hiddens + 1, dtype=dtype, device=H_0.device)
            H1[:, :hiddens] = H_0[k]
            self.H1.append(H1)
            P = H1 @ self.W[k]  # the recurrent part, H_0 W_h + b_h, is the first step's
            self.P.append(P)
            self.outputs.append(P[:, : W_in.shape[1]])
            self.recurrent.append(P[:, W_in.shape[1] :])
            self.S.append(S_0[k].to(torch.float32, copy=True).contiguous())
        self.logits = self.outputs[-1]
        self.picked = self.table.new_empty((batch, self.table.shape[1]))  # the rows of a batch's ids
        # The step compiled (the cell's kernel) where it can run: a step is then one call, where
        # the Python step issues a dozen operations a layer.
        if compiled is None:
            compiled = model.path == "compiled" or (model.scratch_core is None and "compiled" in recurrence.available(cell, H_0.device))
        self.compiled = compiled and H_0.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)

    def __call__(self, X_t: list[int] | torch.Tensor) -> torch.Tensor:
        """X_t: the ids, a list (batch 1: a row view is the cheapest input) or a tensor (batch > 1)."""
        if self.compiled:
            ids = X_t if isinstance(X_t, torch.Tensor) else torch.tensor(X_t)
            recurrence.ops(self.cell, "step")(ids, self.table, self.W, self.H1, self.P, self.S)
            return self.logits
        if isinstance(X_t, list):
            inputs = self.rows[X_t[0]][None] if len(X_t) == 1 else self.table[X_t]
        else:
            inputs = torch.index_select(self.table, 0, X_t, out=self.picked)
        for H1, W, P, S, outputs, recurrent in zip(self.H1, self.W, self.P, self.S, self.outputs, self.recurrent):
            H1[:, :-1] = self.cell.rows(recurrent, inputs, S)  # the cell's elementwise part: S in place, H_t
            torch.mm(H1, W, out=P)
            inputs = outputs  # the next layer's X_t W_x + b
        return self.logits

    def greedy(self, X_t: list[int], steps: int) -> list[list[int]]:
        """`steps` greedy characters after reading X_t, each fed back: their ids, a list a step."""
        if self.compiled:
            chosen = recurrence.ops(self.cell, "greedy")(torch.tensor(X_t), steps, self.logits.shape[1], self.table, self.W, self.H1, self.P, self.S)
            return cast(list[list[int]], chosen.tolist())
        chosen = []
        for _ in range(steps):
            X_t = self(X_t).argmax(dim=-1).tolist()
            chosen.append(X_t)
        return chosen


class LoopStepper:
    """One character at a time through the model's own forward (the cell's readable step): for a
    cell the `Stepper`'s products cannot express. Slower, and the same function."""

    def __init__(self, model: CharLM, state: State, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.state = model, state

    def __call__(self, X_t: list[int] | torch.Tensor) -> torch.Tensor:
        ids = X_t if isinstance(X_t, torch.Tensor) else torch.tensor(X_t, device=self.model.W_hq.device)
        logits, self.state = self.model(ids[:, None], self.state)
        return cast(torch.Tensor, logits[:, 0])

    def greedy(self, X_t: list[int], steps: int) -> list[list[int]]:
        chosen = []
        for _ in range(steps):
            X_t = self(X_t).argmax(dim=-1).tolist()
            chosen.append(X_t)
        return chosen


def stepper(model: CharLM, state: State, dtype: torch.dtype = torch.float32) -> Stepper | LoopStepper:
    """The stepper for `model`: on its stacked weights where the cell's step is a product then an
    elementwise part, else through its forward."""
    return Stepper(model, state, dtype) if model.cell.torch_equivalent else LoopStepper(model, state, dtype)


CHUNK = 32  # characters made per resumption of the inner generator


def step_dtype(precision: str, device: torch.device, num_samples: int) -> torch.dtype:
    """The dtype of the Stepper's products: the precision's, but fp32 for one sample on a CPU.
    There a step is a row-vector product, bound by reading the weights, not by arithmetic, and
    torch's bf16 kernel runs it at half the fp32 rate (measured on this project's AVX-512 EPYC:
    30,000 against 60,000 characters/s for the d2l model), so bf16 would only be less exact."""
    if num_samples == 1 and device.type == "cpu":
        return torch.float32
    return DTYPES[precision]


def ids_on_host(device: torch.device, num_samples: int) -> bool:
    """Whether each step's chosen ids come back to the host as Python ints: for one sample on a
    CPU, where an int is the cheapest input (a row view) and decoding needs it anyway. On a GPU
    that would wait for the device at every character: there the ids stay on the device and a
    chunk of them comes back at once."""
    return num_samples == 1 and device.type == "cpu"


def generate(
    model: CharLM, vocab: Vocab, prefix: str, sampling: Sampling = Sampling(), prime: str | Sequence[str] = "", precision: str = "fp32"
) -> Continuation:
    """Per step, the next character of each of `sampling.num_samples` continuations of
    `prefix`, the state having read `prime` first (context that is not part of the output; see
    `prime_text`): a text, or a list of tokens (what `Continuation.tokens` holds, where a
    generated "<unk>" is one token). The products run in `precision` ("fp32" or "bf16"). With
    stop strings, see `Continuation` for what a step holds.

    The characters are made `CHUNK` at a time: torch re-enters inference mode on every
    resumption of a decorated generator, which at a character's cost of ~0.1 ms is worth
    avoiding; a chunk still streams within a few milliseconds."""
    chunks = _generate_chunks(model, vocab, [*prime, *prefix], sampling, precision)
    return Continuation(chunks, sampling.stop, sampling.num_samples)


@torch.inference_mode()
def _generate_chunks(model: CharLM, vocab: Vocab, context: Sequence[str], sampling: Sampling, precision: str) -> Iterator[list[list[str]]]:
    """`generate`'s characters, CHUNK steps at a time, after reading `context` (its tokens)."""
    device = model.W_hq.device
    generator = torch.Generator(device=device)  # its own: sampling never moves the global RNG
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    ids = torch.tensor([vocab.index[c] for c in context], device=device).repeat(sampling.num_samples, 1)  # (samples, len)
    state = model.begin_state(sampling.num_samples)
    if ids.shape[1] > 1:  # warm up on all but the last character at once
        with autocast(device, precision):
            _, state = model(ids[:, :-1], state)
    step = stepper(model, state, step_dtype(precision, device, sampling.num_samples))
    tokens = vocab.tokens
    length = sampling.length
    if ids_on_host(device, sampling.num_samples) and sampling.temperature <= 0.0:  # d2l's predict, a chunk at a time
        X = ids[:, -1].tolist()
        for start in range(0, length, CHUNK):
            made = step.greedy(X, min(CHUNK, length - start))
            X = made[-1]
            yield [[tokens[i] for i in row] for row in made]
        return
    if ids_on_host(device, sampling.num_samples):
        X = ids[:, -1].tolist()
        for start in range(0, length, CHUNK):
            chunk = []
            for _ in range(min(CHUNK, length - start)):
                X = choose_next(step(X), sampling, generator).tolist()
                chunk.append([tokens[i] for i in X])
            yield chunk
        return
    chosen = ids.new_empty((CHUNK, sampling.num_samples))  # a chunk's ids, kept on the device and decoded at once
    previous = ids[:, -1].contiguous()
    for start in range(0, length, CHUNK):
        n = min(CHUNK, length - start)
        for t in range(n):
            chosen[t].copy_(choose_next(step(previous), sampling, generator))  # step reads `previous` first
            previous = chosen[t]
        yield [[tokens[i] for i in row] for row in chosen[:n].tolist()]


class Continuation(Iterator[list[str]]):
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

    def __init__(self, chunks: Iterator[list[list[str]]], stop: tuple[str, ...], num_samples: int) -> None:
        self._chunks = chunks
        self._steps: Iterator[list[str]] = (chars for chunk in chunks for chars in chunk)
        self.stop = stop
        self.ended: list[str | None] = [None] * num_samples
        self._held = [""] * num_samples  # per sample: text that may begin a stop string
        self._added: list[list[str]] = []  # per step: what each sample added (one list append a step)
        self._written: list[list[str]] = []  # with stop strings, per step: what the model wrote for each sample
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

    def __next__(self) -> list[str]:
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

    def close(self) -> None:
        """Stop generating (the model's work ends here); the steps end."""
        self._finished = True
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def complete(model: CharLM, vocab: Vocab, prefix: str, length: int = SAMPLE_LENGTH, prime: str = "") -> str:
    """The prefix and its greedy continuation as a string, as training's samples show it (the
    model runs in eval mode, then is restored)."""
    was_training = model.training
    model.eval()
    try:
        return prefix + "".join(chars[0] for chars in generate(model, vocab, prefix, Sampling(length=length), prime))
    finally:
        model.train(was_training)
