"""Choosing the next character as `sampling.Sampling` asks: `Rows`, the choice for every row of
a batch in one pass.

temperature 0 is the seed's greedy argmax (d2l's predict_ch8); above 0 the next character is
sampled from softmax(logits / temperature), cut to the top-k characters, to the smallest set
whose probability reaches top-p, and to those at least min-p times as likely as the most likely
one. Each row has its own settings and its own random stream, so a row chooses what it would
choose alone, whoever else is in the batch (the server's continuous batching relies on it).

One pass over the batch: the logits sorted once per row; each cut is a prefix of that order
(top-k the first k, top-p where the mass before a character is under p, min-p where a
character's probability is over min-p times the first's), so what survives is a row's first
n characters, and a draw is one uniform u per row: the first character whose cumulative mass
passes u times the mass kept. The most likely character always survives every cut (top-p 0
keeps it), and a temperature too small for float arithmetic still picks it: the logits are
taken relative to the row's largest before they are divided, so every other one underflows to
probability 0 instead of the division overflowing to NaN.

A row's stream is its own torch.Generator, seeded with the request's seed, read BLOCK uniforms
at a time (one call per row per BLOCK characters, not one per row per character). A row holds
two blocks, so that a chunk of up to BLOCK steps (`settings`) finds its draws in one place;
the blocks come from the generator in the same order either way, so the draws do too.

On a CPU the pass is compiled where the compiled recurrence is (csrc/choosing.cpp, the same cuts
and draw a row at a time): in torch it is fifteen operations of a few microseconds each, a
quarter of a millisecond a step at batch 64, longer than the step itself. Both ways a row reads
only its own logits, settings and draw; their sums may differ in the last bit, as the compiled
step's products do from torch's, so a seed's text is the same wherever the same path runs.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native
from .sampling import Sampling, row_seed

BLOCK = 256  # uniforms a row's generator gives at a time: a call per row every 256 characters


class Rows:
    """Each row's sampling settings as tensors (batch,), and its random stream: `choose` takes
    the logits (batch, vocab) and gives the next ids (batch,). Rows are added with `add` and
    kept with `keep` as a batch's rows come and go; a row's choices never depend on the others."""

    def __init__(self, device: torch.device | str = "cpu", compiled: bool | None = None) -> None:
        """`compiled`: choose by the compiled pass; by default on a CPU where it can run."""
        self.device = torch.device(device)
        self.compiled = (self.device.type == "cpu" and native.usable()) if compiled is None else compiled
        self.temperature = torch.empty(0, device=self.device)  # 1 for a greedy row (never read)
        self.top_k = torch.empty(0, dtype=torch.long, device=self.device)  # 0: every character
        self.top_p = torch.empty(0, device=self.device)
        self.min_p = torch.empty(0, device=self.device)
        self.greedy = torch.empty(0, dtype=torch.bool, device=self.device)
        self.draws = np.empty(0, dtype=bool)  # on the host (numpy: never a wait for a device): the rows that sample
        self.generators: list[torch.Generator | None] = []  # None for a greedy row: it draws nothing
        self.uniforms = torch.empty((0, 2 * BLOCK), device=self.device)  # each row's two blocks of random numbers
        self.used = np.empty(0, dtype=np.int64)  # on the host: how many of its blocks each row has used
        self.all_greedy = True
        self.cuts = np.empty((0, 3), dtype=bool)  # on the host: which rows cut by top-k, top-p, min-p
        self.cutting = (False, False, False)  # whether any row does
        self._rank: torch.Tensor | None = None  # 0, 1, ..., vocab - 1

    def __len__(self) -> int:
        return len(self.generators)

    def add(self, sampling: Sampling, count: int = 1) -> None:
        """`count` rows with these settings, row i of them seeded with `row_seed(sampling, i)`."""
        # a temperature below float32's smallest normal would be 0 (or lose digits) on the device: the smallest is as greedy
        T = 1.0 if sampling.greedy else max(sampling.temperature, torch.finfo(torch.float32).tiny)
        device = self.device
        self.temperature = torch.cat([self.temperature, torch.full((count,), T, device=device)])
        self.top_k = torch.cat([self.top_k, torch.full((count,), sampling.top_k, dtype=torch.long, device=device)])
        self.top_p = torch.cat([self.top_p, torch.full((count,), sampling.top_p, device=device)])
        self.min_p = torch.cat([self.min_p, torch.full((count,), sampling.min_p, device=device)])
        self.greedy = torch.cat([self.greedy, torch.full((count,), sampling.greedy, device=device)])
        self.draws = np.concatenate([self.draws, np.full(count, not sampling.greedy)])
        self.generators += [None if sampling.greedy else stream(row_seed(sampling, i), self.device) for i in range(count)]
        self.uniforms = torch.cat([self.uniforms, torch.zeros((count, 2 * BLOCK), device=device)])
        self.used = np.concatenate([self.used, np.full(count, 2 * BLOCK, dtype=np.int64)])  # fresh blocks at its first draw
        self.all_greedy = self.all_greedy and sampling.greedy
        self.cuts = np.concatenate([self.cuts, np.tile([sampling.top_k > 0, sampling.top_p < 1.0, sampling.min_p > 0.0], (count, 1))])
        self._cutting()

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, in this order."""
        index = torch.tensor(rows, dtype=torch.long)
        on_device = index.to(self.device)
        self.temperature, self.top_k, self.top_p, self.min_p, self.greedy, self.uniforms = (
            t[on_device] for t in (self.temperature, self.top_k, self.top_p, self.min_p, self.greedy, self.uniforms)
        )
        self.used, self.draws, self.cuts = self.used[rows], self.draws[rows], self.cuts[rows]
        self.generators = [self.generators[i] for i in rows]
        self.all_greedy = all(g is None for g in self.generators)
        self._cutting()

    def _cutting(self) -> None:
        top_k, top_p, min_p = (bool(self.cuts[:, j].any()) for j in range(3))
        self.cutting = (top_k, top_p, min_p)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next ids (batch,) from logits (batch, vocab)."""
        if self.all_greedy:
            return logits.argmax(dim=-1)
        if self.compiled:
            library = native.recurrence()
            assert library is not None  # compiled only where it loaded
            chosen = library.choose(logits, *self.settings(1))
            self.drawn(1)
            return chosen  # type: ignore[no-any-return]
        sorted_logits, order = logits.float().sort(dim=-1, descending=True, stable=True)  # (batch, vocab)
        kept = self.kept(torch.exp((sorted_logits - sorted_logits[:, :1]) / self.temperature[:, None]))
        cumulative = kept.cumsum(dim=-1)  # (batch, vocab): the mass kept up to each character
        total = cumulative[:, -1:]  # (batch, 1)
        # where in the kept mass the draw falls, below the total (u·total can round up to it): the
        # first character whose cumulative mass passes it has a weight above 0, and is kept
        u = torch.minimum(self.draw()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        chosen = order.gather(-1, (cumulative <= u).sum(dim=-1, keepdim=True)).squeeze(-1)
        return chosen if self.draws.all() else torch.where(self.greedy, logits.argmax(dim=-1), chosen)

    def kept(self, weights: torch.Tensor) -> torch.Tensor:
        """`weights` (batch, vocab): each row's exp((logit - the largest) / T) in sorted order, the
        first 1; zero where top-k, top-p or min-p cut (the first always stays). A cut no row makes
        is skipped: it is nothing to a row that does not make it."""
        vocab = weights.shape[-1]
        if self._rank is None or self._rank.shape[0] != vocab:
            self._rank = torch.arange(vocab, device=weights.device)  # (vocab,)
        top_k, top_p, min_p = self.cutting
        if top_k:
            k = torch.where(self.top_k > 0, self.top_k, vocab)[:, None]  # (batch, 1)
            weights = weights.masked_fill(self._rank >= k, 0.0)
        if top_p:
            before = weights.cumsum(dim=-1) - weights  # mass of the more likely characters (unnormalized)
            cut = (before >= self.top_p[:, None] * weights.sum(dim=-1, keepdim=True)) & (self._rank > 0) & (self.top_p < 1.0)[:, None]
            weights = weights.masked_fill(cut, 0.0)
        if min_p:
            weights = weights.masked_fill(weights < self.min_p[:, None], 0.0)  # min-p times the likeliest's weight, which is 1
        return weights

    def settings(self, steps: int) -> tuple[torch.Tensor, ...]:
        """What the compiled choice reads for the next `steps` draws of each row (csrc/choosing.cpp,
        `Settings`): temperature, top-k, top-p, min-p, greedy, the uniforms and where each row's
        next is; the caller moves `used` on by the steps it took."""
        self.refill(steps)
        T, top_p, min_p, uniforms = (t.float() for t in (self.temperature, self.top_p, self.min_p, self.uniforms))  # float32 whatever the default dtype
        return T, self.top_k, top_p, min_p, self.greedy, uniforms, torch.from_numpy(self.used)

    def drawn(self, steps: int) -> None:
        """The compiled steps took `steps` draws of each row that `settings(steps)` gave."""
        self.used += steps

    def draw(self) -> torch.Tensor:
        """One uniform in [0, 1) per row (batch,): the next of its blocks, a row's generator
        giving a fresh block where it has used its last. Greedy rows draw nothing (0)."""
        self.refill()
        at = torch.from_numpy(np.minimum(self.used, 2 * BLOCK - 1))
        u = self.uniforms.gather(-1, (at if self.device.type == "cpu" else at.to(self.device, non_blocking=True))[:, None]).squeeze(-1)
        self.used += 1
        return u

    def refill(self, steps: int = 1) -> None:
        """Each row that draws holds its next `steps` uniforms (at most BLOCK): where it would run
        past its second block, the first (used up) goes, the second moves down, and the row's
        generator gives the next block."""
        if not 0 < steps <= BLOCK:
            raise ValueError(f"a chunk of 1 to {BLOCK} draws, not {steps}")
        for i in np.flatnonzero((self.used + steps > 2 * BLOCK) & self.draws):  # one row in BLOCK / steps on average, each call
            generator = self.generators[i]
            assert generator is not None
            self.uniforms[i, :BLOCK] = self.uniforms[i, BLOCK:]
            self.uniforms[i, BLOCK:] = torch.rand(BLOCK, generator=generator, device=self.device)
            self.used[i] -= BLOCK


def stream(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own generator (sampling never moves the global one): seeded, or from the OS."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def choose_next(logits: torch.Tensor, sampling: Sampling = Sampling()) -> torch.Tensor:
    """Next ids (batch,) from logits (batch, vocab), every row with `sampling`'s settings and
    its own stream (row i seeded with seed + i)."""
    rows = Rows(logits.device)
    rows.add(sampling, logits.shape[0])
    return rows.choose(logits)
