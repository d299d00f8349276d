"""Training speed: the seed's own code against lstmlm's, side by side (the speed issues' table).

    python benchmarks/bench_train.py [--config d2l|larger|both|widths] [--rounds 7] [--precision auto|fp32|bf16|fp32,bf16]
                                     [--device cpu|cuda] [--threads N] [--json]

Contenders, each training with its own step on the same batches:

- seed scratch: the article's code as written — get_lstm_params / init_lstm_state / lstm, the
  per-gate loop on F.one_hot(X.T, V).float() inputs, in d2l's RNNModelScratch — trained with
  d2l's train_epoch_ch8 step: state detached between batches, l.backward() on the mean loss,
  d2l's grad_clipping (the global norm computed by hand) and d2l's sgd (param -= lr · grad).
- seed nn.LSTM: the article's second model, d2l's RNNModel (nn.LSTM on one-hot input, then
  nn.Linear), with the same step and torch.optim.SGD as d2l's train_ch8 gives it.
- lstmlm scratch / cudnn: CharLM with lstmlm.step.train_step, in fp32 and (where asked) bf16.

The d2l config runs on The Time Machine as lstmlm encodes it (d2l mode, first 10,000 tokens,
from $LSTMLM_TEST_DATA, default ../shared/data) in lstmlm.batches.sequential's batches; the
larger config (batch 64, 100 steps, 512 hidden, 2 layers, 65 characters) on random ids, as
the widths (one layer 128, 256, 512 and 1024 wide, each at batch 16 and 64, 35 steps). A
round is one epoch (d2l: 8 batches of 32×35) or 4 batches (the others); the contenders alternate
round by round (A B C A B C …) so a slower moment slows all of them alike, and each figure
is the median over the rounds. On a shared machine a round during which other processes
were busy is discarded and rerun (`--patience`): one busy neighbour halves a 2-thread run.
SGD lr 1, clipping θ = 1 everywhere, as d2l. Each figure is also shown as a fraction of the
matching ceiling: its FLOPs per trained token (lstmlm.bench) times tokens/s, over this
machine's large-product rate in the same precision.

Then generation of the d2l model (lstmlm.bench.measure_generation): one greedy continuation
(batch 1, d2l's predict) and 64 sampled at once, characters/s counted over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lstmlm.bench import Dims, machine, measure_generation, measure_matmul_ceiling, training_flops_per_token
from lstmlm.data import batches as lstmlm_batches
from lstmlm.data.pipeline import build_vocab
from lstmlm.data.text import normalize, read_text
from lstmlm.device import keep_freed_memory, resolve_precision
from lstmlm.model import CharLM
from lstmlm.step import train_step

D2L = Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35)
LARGER = Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100)
LARGER_BATCHES_PER_ROUND = 4
# --config widths: one layer at each width and batch, 35 steps, 65 characters, on random ids
WIDTHS = {f"w{h} b{b}": Dims(vocab_size=65, hidden=h, layers=1, batch_size=b, num_steps=35) for h in (128, 256, 512, 1024) for b in (16, 64)}
CONFIGS = {"d2l": D2L, "larger": LARGER, **WIDTHS}
LR, THETA = 1.0, 1.0
Batch = tuple[torch.Tensor, torch.Tensor]


# ---- the seed's code, from the article (d2l's chapter 9.2 and the functions it imports) ---------


def get_lstm_params(vocab_size: int, num_hiddens: int, device: torch.device) -> list[torch.Tensor]:
    num_inputs = num_outputs = vocab_size

    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size=shape, device=device) * 0.01

    def three() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (normal((num_inputs, num_hiddens)), normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens, device=device))

    W_xi, W_hi, b_i = three()  # input gate
    W_xf, W_hf, b_f = three()  # forget gate
    W_xo, W_ho, b_o = three()  # output gate
    W_xc, W_hc, b_c = three()  # candidate memory cell
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_lstm_state(batch_size: int, num_hiddens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros((batch_size, num_hiddens), device=device), torch.zeros((batch_size, num_hiddens), device=device))


def lstm(inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], params: list[torch.Tensor]):
    [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q] = params
    (H, C) = state
    outputs = []
    for X in inputs:
        I = torch.sigmoid((X @ W_xi) + (H @ W_hi) + b_i)
        F_ = torch.sigmoid((X @ W_xf) + (H @ W_hf) + b_f)
        O = torch.sigmoid((X @ W_xo) + (H @ W_ho) + b_o)
        C_tilda = torch.tanh((X @ W_xc) + (H @ W_hc) + b_c)
        C = F_ * C + I * C_tilda
        H = O * torch.tanh(C)
        Y = (H @ W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H, C)


class RNNModelScratch:
    """d2l's RNNModelScratch: one-hot input, then the forward function."""

    def __init__(self, vocab_size: int, num_hiddens: int, device: torch.device, get_params, init_state, forward_fn) -> None:
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X: torch.Tensor, state):
        X = F.one_hot(X.T, self.vocab_size).type(torch.float32)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size: int, device: torch.device):
        return self.init_state(batch_size, self.num_hiddens, device)


class RNNModel(nn.Module):
    """d2l's RNNModel: nn.LSTM on one-hot input, then nn.Linear."""

    def __init__(self, rnn_layer: nn.LSTM, vocab_size: int) -> None:
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 1
        self.linear = nn.Linear(self.num_hiddens, self.vocab_size)

    def forward(self, inputs: torch.Tensor, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size)
        X = X.to(torch.float32)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, device: torch.device, batch_size: int = 1):
        shape = (self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens)
        return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))


def grad_clipping(net, theta: float) -> None:
    """d2l's: the global gradient norm, computed by hand."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def sgd(params: list[torch.Tensor], lr: float, batch_size: int) -> None:
    """d2l's minibatch SGD."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def seed_epoch(net, batches: Iterable[Batch], updater, device: torch.device) -> int:
    """d2l's train_epoch_ch8 (sequential iterator), less its timer; returns the tokens seen."""
    state, loss, tokens = None, nn.CrossEntropyLoss(), 0
    total = 0.0  # d2l's Accumulator: a float per batch, so one host sync per batch
    for X, Y in batches:
        if state is None:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            for s in state:
                s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, THETA)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, THETA)
            updater(batch_size=1)
        total += float(l.detach() * y.numel())
        tokens += y.numel()
    return tokens


# ---- lstmlm ------------------------------------------------------------------------------------


def lstmlm_epoch(model: CharLM, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], device: torch.device, precision: str) -> int:
    """lstmlm's step on each batch, the state carried and detached, as its trainer does."""
    state, tokens, loss = None, 0, torch.zeros(())
    for X, Y in batches:
        loss, state = train_step(model, optimizer, X.to(device), Y.to(device), state, THETA, device, precision)
        state = (state[0].detach(), state[1].detach())
        tokens += Y.numel()
    loss.item()  # wait for the device
    return tokens


# ---- data --------------------------------------------------------------------------------------


def timemachine_ids() -> torch.Tensor:
    """The seed's corpus as lstmlm encodes it in d2l mode: the first 10,000 token ids."""
    data = Path(os.environ.get("LSTMLM_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = data / "timemachine.txt"
    if not path.is_file():
        sys.exit(f"bench_train: {path} not found (set LSTMLM_TEST_DATA to the directory holding timemachine.txt)")
    text = normalize(read_text(path, limit=1 << 30), "d2l")  # the whole corpus, however long
    vocab = build_vocab(text, "d2l")
    assert len(vocab) == D2L.vocab_size, f"expected d2l's 28 tokens, got {len(vocab)}"
    return vocab.encode(text)[:10_000]


def d2l_rounds(ids: torch.Tensor) -> Callable[[int], list[Batch]]:
    """Round r's epoch of sequential batches; every contender gets the same ones in round r."""
    return lambda r: list(lstmlm_batches.sequential(ids, D2L.batch_size, D2L.num_steps, random.Random(r)))


def synthetic_rounds(dims: Dims, count: int) -> Callable[[int], list[Batch]]:
    def make(r: int) -> list[Batch]:
        g = torch.Generator().manual_seed(r)
        ids = torch.randint(0, dims.vocab_size, (count, dims.batch_size, dims.num_steps + 1), generator=g)
        return [(b[:, :-1], b[:, 1:]) for b in ids]

    return make


# ---- the race ----------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    epoch: Callable[[list[Batch]], int]  # trains on the batches, returns the tokens seen
    rates: list[float]
    error: str = ""


def seed_scratch(device: torch.device) -> Contender:
    net = RNNModelScratch(D2L.vocab_size, D2L.hidden, device, get_lstm_params, init_lstm_state, lstm)
    updater = lambda batch_size: sgd(net.params, LR, batch_size)  # noqa: E731
    return Contender("seed scratch", lambda bs: seed_epoch(net, bs, updater, device), [])


def seed_nn_lstm(device: torch.device) -> Contender:
    net = RNNModel(nn.LSTM(D2L.vocab_size, D2L.hidden), D2L.vocab_size).to(device)
    updater = torch.optim.SGD(net.parameters(), LR)
    return Contender("seed nn.LSTM", lambda bs: seed_epoch(net, bs, updater, device), [])


def lstmlm_contender(core: str, dims: Dims, device: torch.device, precision: str) -> Contender:
    model = CharLM(dims.vocab_size, dims.hidden, dims.layers, core=core).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    return Contender(f"{core} {precision}", lambda bs: lstmlm_epoch(model, optimizer, bs, device, precision), [])


def race(contenders: list[Contender], rounds: Callable[[int], list[Batch]], count: int, device: torch.device, patience: int) -> int:
    """Round r: each contender in turn trains on round r's batches; tokens/s into `rates`.
    Round 0 is a warm-up. A round during which other processes took more than 2% of the CPU is
    discarded and run again with new batches, up to `patience` times in all (on a shared
    machine a single busy neighbour halves a 2-thread run). Returns the rounds discarded."""
    r, discarded = 0, 0
    while min((len(c.rates) for c in contenders if not c.error), default=count) < count:
        batches = rounds(r)
        with OtherLoad() as load:
            rates = {c.name: _time_round(c, batches, device) for c in contenders if not c.error}
        r += 1
        if r == 1:
            continue
        if load.busy and discarded < patience:
            discarded += 1
            continue
        for c in contenders:
            if rates.get(c.name) is not None:
                c.rates.append(rates[c.name])  # type: ignore[arg-type]
    return discarded


def _time_round(c: Contender, batches: list[Batch], device: torch.device) -> float | None:
    try:
        _synchronize(device)
        start = time.perf_counter()
        tokens = c.epoch(batches)
        _synchronize(device)
    except RuntimeError as e:  # a kernel this machine lacks
        c.error = str(e).splitlines()[0][:100]
        return None
    return tokens / (time.perf_counter() - start)


class OtherLoad:
    """Whether other processes took more than 2% of the machine's CPU during the block, from
    /proc/stat less this process's own time (Linux; elsewhere never busy)."""

    def __enter__(self) -> OtherLoad:
        self.start = time.perf_counter(), _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, before = time.perf_counter() - self.start[0], self.start[1]
        after = _cpu_jiffies()
        self.busy = False
        if before is not None and after is not None:
            others = (after[0] - before[0]) - (after[1] - before[1])  # jiffies
            self.busy = others / os.sysconf("SC_CLK_TCK") > 0.02 * wall * (os.cpu_count() or 1)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(all processes' busy CPU time, this process's), in clock ticks."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, int(mine[11]) + int(mine[12])  # utime + stime, all threads


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the report --------------------------------------------------------------------------------

# (config, numerator, denominator, target): the CPU speed issues' table. "lstmlm fastest" and
# "seed fastest" are the best of each side's contenders; the scratch core is held to nn.LSTM's
# speed (1.0) at every size, in each precision.
TARGETS = [
    ("d2l", "lstmlm fastest", "seed fastest", 2.0),
    ("d2l", "scratch fp32", "cudnn fp32", 1.0),
    ("d2l", "scratch bf16", "cudnn bf16", 1.0),
    ("d2l", "scratch bf16", "scratch fp32", 1.6),
    ("d2l", "cudnn fp32", "seed nn.LSTM", 1.0),
    ("larger", "scratch fp32", "cudnn fp32", 1.0),
    ("larger", "scratch bf16", "cudnn bf16", 1.0),
    ("larger", "scratch bf16", "cudnn fp32", 2.0),
    *((cfg, f"scratch {p}", f"cudnn {p}", 1.0) for cfg in WIDTHS for p in ("fp32", "bf16")),
]
GENERATION_TARGETS = {1: 55_000.0, 64: 500_000.0}  # chars/s of the d2l model: one greedy sample; 64 at once, in all


def median(c: Contender) -> float | None:
    return statistics.median(c.rates) if c.rates else None


def best_of(medians: dict[tuple[str, str], float | None], cfg: str, seed: bool) -> float | None:
    rates = [r for (c, name), r in medians.items() if c == cfg and name.startswith("seed") == seed and r]
    return max(rates) if rates else None


def ceiling_share(cfg: str, name: str, rate: float | None, ceilings: dict[str, float]) -> float | None:
    """tokens/s × FLOPs per trained token over the ceiling of the contender's precision."""
    dims = CONFIGS[cfg]
    precision = "bf16" if name.endswith("bf16") else "fp32"
    if not rate or precision not in ceilings:
        return None
    return rate * training_flops_per_token(dims) / 1e9 / ceilings[precision]


def report(results: dict[str, list[Contender]], discarded: dict[str, int], generation: dict[str, float],
           ceilings: dict[str, float], device: torch.device, as_json: bool) -> None:  # fmt: skip
    medians: dict[tuple[str, str], float | None] = {(cfg, c.name): median(c) for cfg, cs in results.items() for c in cs}
    for cfg in results:
        medians[(cfg, "lstmlm fastest")] = best_of(medians, cfg, seed=False)
        medians[(cfg, "seed fastest")] = best_of(medians, cfg, seed=True)
    ratios = []
    for cfg, num, den, target in TARGETS:
        if (cfg, num) in medians and (cfg, den) in medians:
            a, b = medians[(cfg, num)], medians[(cfg, den)]
            ratios.append((cfg, f"{num} / {den}", a / b if a and b else None, target))
    about = machine(device)
    if as_json:
        print(json.dumps({
            "machine": about.__dict__,
            "ceilings_gflops": ceilings,
            "tokens_per_s": {cfg: {c.name: {"median": median(c), "of_ceiling": ceiling_share(cfg, c.name, median(c), ceilings),
                                            "rounds": c.rates, "error": c.error} for c in cs} for cfg, cs in results.items()},
            "ratios": [{"config": cfg, "figure": fig, "ratio": r, "target": t} for cfg, fig, r, t in ratios],
            "discarded_busy_rounds": discarded,
            "generation_chars_per_s": generation,
        }, indent=2))  # fmt: skip
        return
    print("machine: " + ", ".join(f"{k} {v}" for k, v in about.__dict__.items()))
    print("ceilings: " + ", ".join(f"{p} {g:,.1f} GFLOP/s" for p, g in ceilings.items()))
    print(f"\n{'config':9} {'contender':16} {'tokens/s':>10} {'of ceiling':>10}  rounds")
    for cfg, cs in results.items():
        print(f"{cfg:9} ({discarded.get(cfg, 0)} rounds discarded: other processes were busy)")
        for c in cs:
            rate = median(c)
            figure = f"{rate:10,.0f}" if rate else f"{'—':>10}"
            share = ceiling_share(cfg, c.name, rate, ceilings)
            shown = f"{share:10.0%}" if share is not None else f"{'':>10}"
            print(f"{cfg:9} {c.name:16} {figure} {shown}  {len(c.rates)}{'  ' + c.error if c.error else ''}")
    print(f"\n{'config':9} {'figure':36} {'ratio':>7}  target")
    for cfg, fig, r, target in ratios:
        shown = f"{r:7.2f}" if r is not None else f"{'—':>7}"
        verdict = "" if r is None else ("  met" if r >= target else "  NOT met")
        print(f"{cfg:9} {fig:36} {shown}  ≥ {target}{verdict}")
    for name, rate in generation.items():
        samples = 64 if name.endswith("×64") else 1
        target = GENERATION_TARGETS[samples]
        verdict = "met" if rate >= target else "NOT met"
        print(f"{'d2l':8} {'generation ' + name + ' (chars/s)':36} {rate:7,.0f}  ≥ {target:,.0f}  {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["d2l", "larger", "both", "widths"], default="both")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or a comma list (auto: fp32, plus bf16 where it is fast)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--patience", type=int, default=100, help="busy rounds to discard and rerun, at most")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as lstmlm's training does: for every contender alike, the seed's included
    device = torch.device(args.device)
    precisions = precisions_for(args.precision, device)
    torch.manual_seed(0)

    results: dict[str, list[Contender]] = {}
    discarded: dict[str, int] = {}
    if args.config in ("d2l", "both"):
        contenders = [seed_scratch(device), seed_nn_lstm(device)]
        contenders += [lstmlm_contender(core, D2L, device, p) for p in precisions for core in ("scratch", "cudnn")]
        discarded["d2l"] = race(contenders, d2l_rounds(timemachine_ids()), args.rounds, device, args.patience)
        results["d2l"] = contenders
    if args.config in ("larger", "both"):
        contenders = [lstmlm_contender(core, LARGER, device, p) for p in precisions for core in ("scratch", "cudnn")]
        discarded["larger"] = race(contenders, synthetic_rounds(LARGER, LARGER_BATCHES_PER_ROUND), args.rounds, device, args.patience)
        results["larger"] = contenders
    for cfg, dims in WIDTHS.items() if args.config == "widths" else ():
        contenders = [lstmlm_contender(core, dims, device, p) for p in precisions for core in ("scratch", "cudnn")]
        discarded[cfg] = race(contenders, synthetic_rounds(dims, LARGER_BATCHES_PER_ROUND), args.rounds, device, args.patience)
        results[cfg] = contenders
    generation = {} if args.no_generation or args.config == "widths" else generation_speeds(device, args.patience)
    ceilings = {p: measure_matmul_ceiling(device, p).gflops for p in sorted({"fp32", *precisions})}
    report(results, discarded, generation, ceilings, device, args.json)


def generation_speeds(device: torch.device, patience: int, runs: int = 3) -> dict[str, float]:
    """Characters/s of the d2l model, each core in turn, one greedy sample and 64 sampled at
    once (in all), in fp32 and in what auto picks; busy runs rerun."""
    precision = resolve_precision("auto", device)
    kinds = {f"{core} {p}" + (" ×64" if n > 1 else ""): (core, p, n)
             for core in ("scratch", "cudnn") for p in sorted({"fp32", precision}) for n in (1, 64)}  # fmt: skip
    speeds: dict[str, list[float]] = {name: [] for name in kinds}
    while len(next(iter(speeds.values()))) < runs:
        with OtherLoad() as load:
            measured = {name: measure_generation(core, D2L, device, p, length=1000 if n == 1 else 100, samples=n).chars_per_s
                        for name, (core, p, n) in kinds.items()}  # fmt: skip
        if load.busy and patience > 0:
            patience -= 1
            continue
        for core, rate in measured.items():
            speeds[core].append(rate)
    return {core: statistics.median(rates) for core, rates in speeds.items()}


def precisions_for(spec: str, device: torch.device) -> list[str]:
    if spec == "auto":
        return ["fp32"] + (["bf16"] if resolve_precision("auto", device) == "bf16" else [])
    return [p.strip() for p in spec.split(",")]


if __name__ == "__main__":
    main()
