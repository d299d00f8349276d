"""Text from a trained model: prime the state on the prefix once, then one step per character.

temperature 0 is the seed's greedy argmax (d2l's predict_ch8); above 0 the next character is
sampled from softmax(logits / temperature), optionally cut to the top-k characters or to the
smallest set whose probability reaches top-p.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .corpus import normalize
from .errors import VocabError
from .model import CharLM
from .vocab import Vocab, describe_chars


def prepare_prefix(prefix: str, vocab: Vocab, mode: str) -> str:
    """The prefix as the model can read it: d2l-normalized for a d2l model; checked for a raw one."""
    if mode == "d2l":
        prefix = normalize(prefix, "d2l")
    if not prefix:
        raise VocabError("the prefix is empty" + (" after d2l normalization" if mode == "d2l" else ""))
    unknown = [c for c in prefix if c not in vocab.index or c == "<unk>"]
    if unknown:
        raise VocabError(f"prefix characters outside the model's vocabulary: {describe_chars(unknown)}")
    return prefix


def choose_next(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next ids (batch,) from logits (batch, vocab)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (batch, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely characters
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # always keeps the most likely
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: CharLM,
    vocab: Vocab,
    prefix: str,
    length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int | None = None,
) -> Iterator[list[str]]:
    """Yield, per step, the next character of each of `num_samples` continuations of `prefix`."""
    device = model.W_hq.device
    generator = torch.Generator(device=device)  # its own: sampling never moves the global RNG
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    ids = torch.tensor([vocab.index[c] for c in prefix], device=device).repeat(num_samples, 1)  # (samples, len)
    state = None
    if ids.shape[1] > 1:  # warm up on all but the last character at once
        _, state = model(ids[:, :-1], state)
    X = ids[:, -1:]  # (samples, 1)
    for _ in range(length):
        logits, state = model(X, state)
        X = choose_next(logits[:, -1], temperature, top_k, top_p, generator).unsqueeze(1)
        yield [vocab.tokens[i] for i in X.squeeze(1).tolist()]


def complete(model: CharLM, vocab: Vocab, prefix: str, length: int, **options: object) -> str:
    """The prefix and one continuation as a string (the model runs in eval mode, then is restored)."""
    was_training = model.training
    model.eval()
    try:
        return prefix + "".join(chars[0] for chars in generate(model, vocab, prefix, length, **options))  # type: ignore[arg-type]
    finally:
        model.train(was_training)
