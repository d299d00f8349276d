"""Generation: greedy equals d2l's predict_ch8, sampling is seeded, both cores generate the
same text from the same weights, prefixes are normalized (d2l) or checked (raw), min-p cuts
the unlikely characters, stop strings end a sample where they first appear, and on a GPU the
chosen ids come back to the host a chunk at a time."""

from __future__ import annotations

import re

import pytest
import torch

from lstmlm import cells, native
from lstmlm import generate as generate_mod
from lstmlm.choosing import BLOCK, Rows, choose_next
from lstmlm.errors import ConfigError, DeviceError, VocabError
from lstmlm.generate import CHUNK, READ_BY_STEPS, Continuation, Sampling, Stepper, alone, complete, decoded, generate, one_by_one, prepare_prefix, prime
from lstmlm.model import CharLM, convert
from lstmlm.stepper import sample_each
from lstmlm.vocab import Vocab

from support.on_a_cpu import as_on_a_gpu, host_syncs
from support.references import predict_ch8
from support.tiny import lively_model, synthetic_text

VOCAB = Vocab.build(synthetic_text(), order="frequency")


def ungated_scale(cell: str, scale: float) -> float:
    """The weights' scale for a test: a cell with no gate (the plain RNN), at the gated cells'
    scale, is chaotic and amplifies fp32's rounding from step to step past any tolerance."""
    return scale if any(g.saturates for g in cells.get(cell).gates) else 0.25


def sample(net: CharLM, prefix: str, length: int, prime: str = "", **options: object) -> str:
    """The prefix and one continuation, sampled as `lstmlm generate` samples."""
    steps = generate(net, VOCAB, prefix, Sampling(length=length, **options), prime)  # type: ignore[arg-type]
    return prefix + "".join(chars[0] for chars in steps)


@pytest.mark.parametrize("cell", cells.NAMES)
@pytest.mark.parametrize("core", ["scratch", "cudnn"])
@pytest.mark.parametrize(("layers", "embedding", "batch"), [(1, 0, 1), (2, 0, 1), (3, 0, 3), (2, 8, 1), (1, 8, 2)])
def test_stepper_computes_what_the_model_computes(cell: str, core: str, layers: int, embedding: int, batch: int, recurrence: str) -> None:
    """Generation's Stepper (fused products, biases in a row, state in place) gives, step after
    step from a non-zero state, the logits of the training model's forward over the sequence."""
    torch.manual_seed(1)
    net = CharLM(len(VOCAB), num_hiddens=24, num_layers=layers, core=core, embedding=embedding, cell=cell, path="loop").eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, ungated_scale(cell, 0.5))
    X = torch.randint(len(VOCAB), (batch, 30))
    state = tuple(torch.randn(layers, batch, 24) for _ in net.cell.state)
    before = tuple(S.clone() for S in state)
    with torch.inference_mode():
        expected, _ = net(X, state)  # (batch, 30, vocab)
        step = Stepper(net, state, compiled=recurrence == "compiled")
        got = torch.stack([step(X[:, t].tolist()).clone() for t in range(30)], dim=1)
    assert step.compiled == (recurrence == "compiled")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(S, S0) for S, S0 in zip(state, before))  # the caller's state is left alone


@pytest.mark.parametrize("cell", cells.NAMES)
def test_stepper_in_bf16_follows_the_fp32_model(cell: str, recurrence: str) -> None:
    """In bf16 the Stepper multiplies in bf16 (logits come out bf16) and keeps its state S (the
    LSTM's C, the others' H) in fp32."""
    net = lively_model(VOCAB, "scratch", layers=2, cell=cell, scale=ungated_scale(cell, 0.8))
    X = torch.randint(len(VOCAB), (1, 20))
    with torch.inference_mode():
        expected, _ = net(X)
        step = Stepper(net, net.begin_state(1), torch.bfloat16, compiled=recurrence == "compiled")
        got = torch.stack([step(X[:, t].tolist()).float() for t in range(20)], dim=1)
    assert step.logits.dtype == torch.bfloat16 and step.S[0].dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.3)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("length", [1, 2, READ_BY_STEPS + 1, READ_BY_STEPS + 2, 40])
def test_prime_reads_a_short_prefix_by_steps_and_a_long_one_by_the_forward_to_the_same_state(length: int, rows: int, recurrence: str) -> None:
    """`prime` reads up to READ_BY_STEPS tokens a step each and more in one forward: either way
    the first step's logits are those of the model's forward over the whole context."""
    net = lively_model(VOCAB, layers=2, path=recurrence)
    context = list(synthetic_text(5, seed=length)[:length])
    ids = torch.tensor([[VOCAB.index[c] for c in context]] * rows)
    with torch.inference_mode():
        expected = net(ids)[0][:, -1]  # (rows, vocab)
        step, last = prime(net, VOCAB, context, rows)
        got = step(last if rows > 1 else last.tolist())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("cell", cells.NAMES)
def test_the_compiled_step_multiplies_bf16_weights_as_torch_does(cell: str, batch: int) -> None:
    """The compiled step reads bf16 weights stored two vectors interleaved (`pack` in
    csrc/recurrence.cpp): from one state, every product it takes (each layer's, the logits
    included) is torch's bf16 product to within a rounding or two (the second layer reads H made
    from the first's rounded product), in the one-row tile and in a batch's tiles, over several
    panels and the padded last one; a column out of place would be off by the products' size."""
    if not native.usable():
        pytest.skip(f"the compiled step cannot run here: {native.status()}")
    torch.manual_seed(0)
    net = CharLM(len(VOCAB), num_hiddens=40, num_layers=2, cell=cell).eval()  # P: 4·40 + 40 or the vocabulary's columns
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    state = tuple(torch.randn(2, batch, 40) for _ in net.cell.state)
    X = torch.randint(len(VOCAB), (batch,))
    with torch.inference_mode():
        compiled, python = (Stepper(net, state, torch.bfloat16, compiled=c) for c in (True, False))
        assert compiled.compiled and not python.compiled
        compiled(X), python(X)
    for got, expected in zip(compiled.P, python.P):
        assert got.dtype == torch.bfloat16 and expected.abs().mean() > 0.5  # products of some size, in bf16
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-6, atol=2**-5)


def test_one_sample_steps_in_bf16_where_the_step_is_compiled() -> None:
    """`--precision bf16` for one sample on a CPU: bf16 where the step is compiled (it reads half
    the bytes, and is the faster), fp32 where torch's row-vector product would take it (half
    fp32's speed there)."""
    if not native.usable():
        pytest.skip(f"the compiled step cannot run here: {native.status()}")
    net = lively_model(VOCAB)
    with native.disabled():
        plain = lively_model(VOCAB)  # a model made where the compiled path cannot run
    with torch.inference_mode():
        step, _ = prime(net, VOCAB, list("the"), 1, "bf16")
        with native.disabled():
            uncompiled, _ = prime(plain, VOCAB, list("the"), 1, "bf16")
    assert isinstance(step, Stepper) and step.compiled and step.table.dtype == torch.bfloat16
    assert isinstance(uncompiled, Stepper) and not uncompiled.compiled and uncompiled.table.dtype == torch.float32


@pytest.mark.parametrize(("core", "layers"), [("scratch", 1), ("scratch", 2), ("cudnn", 1), ("cudnn", 2)])
@pytest.mark.parametrize("prefix", ["time traveller", "t", "the "])
def test_greedy_equals_d2l_predict(core: str, layers: int, prefix: str, recurrence: str) -> None:
    net = lively_model(VOCAB, core, layers, path=recurrence)
    with torch.no_grad():
        expected = predict_ch8(prefix, 40, net, VOCAB)
    assert complete(net, VOCAB, prefix, 40) == expected
    assert len(set(expected[len(prefix) :])) > 1  # not a constant continuation: the test has teeth


def test_both_cores_generate_the_same_text_from_the_same_weights() -> None:
    for source, target in (("scratch", "cudnn"), ("cudnn", "scratch")):
        net = lively_model(VOCAB, source, layers=2)
        twin = CharLM(len(VOCAB), num_hiddens=24, num_layers=2, core=target).eval()
        twin.load_state_dict(convert(net.state_dict(), target, net.cell))
        assert complete(twin, VOCAB, "time traveller", 60) == complete(net, VOCAB, "time traveller", 60)
        for seed in (0, 1):
            options = {"temperature": 0.8, "top_k": 5, "seed": seed}
            assert sample(twin, "time", 60, **options) == sample(net, "time", 60, **options)


# ---- sampling -------------------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different_samples() -> None:
    net = lively_model(VOCAB)
    first = sample(net, "time", 80, temperature=1.0, seed=7)
    assert sample(net, "time", 80, temperature=1.0, seed=7) == first
    assert sample(net, "time", 80, temperature=1.0, seed=8) != first


def test_sampling_leaves_the_global_rng_alone() -> None:
    net = lively_model(VOCAB)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    sample(net, "time", 30, temperature=1.0, seed=1)
    sample(net, "time", 30, temperature=1.0)  # unseeded: its own fresh generator
    assert torch.equal(torch.rand(4), expected)


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    net = lively_model(VOCAB)
    greedy = complete(net, VOCAB, "time", 50)
    assert sample(net, "time", 50, temperature=1.5, top_k=1, seed=0) == greedy
    assert sample(net, "time", 50, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_choose_next_samples_only_inside_top_k_and_top_p() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    assert set(choose_next(logits, Sampling(temperature=1.0, top_k=2, seed=0)).tolist()) == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ...: top-p 0.8 keeps the first two (0.636 < 0.8 ≤ 0.870)
    assert set(choose_next(logits, Sampling(temperature=1.0, top_p=0.8, seed=0)).tolist()) == {0, 1}
    assert set(choose_next(logits, Sampling(temperature=1.0, seed=0)).tolist()) == {0, 1, 2, 3, 4}
    assert choose_next(logits[:3], Sampling(temperature=0.0)).tolist() == [0, 0, 0]


def test_several_samples_are_independent_and_reproducible() -> None:
    net = lively_model(VOCAB)
    steps = lambda: ["".join(c) for c in zip(*generate(net, VOCAB, "time", Sampling(length=40, temperature=1.0, num_samples=3, seed=5)))]  # noqa: E731
    samples = steps()
    assert len(samples) == 3 and len(set(samples)) == 3
    assert steps() == samples


# ---- prefixes -------------------------------------------------------------------------------------


def test_d2l_prefix_is_normalized_as_the_training_text() -> None:
    assert prepare_prefix("Time Traveller!", VOCAB, "d2l") == "time traveller"
    assert prepare_prefix("  THE\tTime--machine ", VOCAB, "d2l") == "the time machine"


def test_d2l_prefix_that_normalizes_to_nothing_is_an_error() -> None:
    with pytest.raises(VocabError, match="the prefix is empty after d2l normalization"):
        prepare_prefix("1984!", VOCAB, "d2l")


def test_raw_prefix_with_unknown_characters_lists_them() -> None:
    with pytest.raises(VocabError, match=r"prefix characters outside the model's vocabulary: '!' 'T' 'é'"):
        prepare_prefix("Time é traveller!", VOCAB, "raw")
    assert prepare_prefix("time traveller", VOCAB, "raw") == "time traveller"


def test_a_prime_of_tokens_reads_a_written_unk_back_as_one_token() -> None:
    """What a continuation wrote, read back as context, is the state the model was in: a
    generated "<unk>" is one token, not five characters the vocabulary does not know."""
    net = lively_model(VOCAB)
    first = generate(net, VOCAB, "time", Sampling(length=300, temperature=2.0, seed=1))
    list(first)
    assert "<unk>" in first.tokens[0]
    context = [*"time", *first.tokens[0]]
    after = sample(net, "t", 40, prime=context, temperature=1.0, seed=2)
    ids = torch.tensor([[VOCAB.index[t] for t in [*context, "t"]]])
    with torch.no_grad():
        _, state = net(ids[:, :-1])
        step = Stepper(net, state)
        greedy = [VOCAB.tokens[int(step([int(ids[0, -1])]).argmax())]]
        for _ in range(39):
            greedy.append(VOCAB.tokens[int(step([VOCAB.index[greedy[-1]]]).argmax())])
    assert sample(net, "t", 40, prime=context) == "t" + "".join(greedy)
    assert after.startswith("t") and len(after) > 40


def test_a_context_outside_the_vocabulary_and_an_unknown_precision_are_refused_by_name() -> None:
    """A library caller's mistakes, each its own error (not a KeyError from a lookup deep in a step)."""
    net = lively_model(VOCAB)
    with pytest.raises(VocabError, match=re.escape("context outside the model's vocabulary: '!' '<zz>'")):
        list(generate(net, VOCAB, "time", Sampling(length=5), prime=["t", "!", "<zz>"]))
    with pytest.raises(VocabError, match=re.escape("context outside the model's vocabulary: 'T'")):
        list(generate(net, VOCAB, "time", Sampling(length=5), prime="The "))
    with pytest.raises(VocabError, match=re.escape("prefix characters outside the model's vocabulary: 'T'")):
        list(generate(net, VOCAB, "Time", Sampling(length=5)))
    with pytest.raises(DeviceError, match=re.escape("unknown precision 'fp16' (expected fp32, bf16 or auto)")):
        list(generate(net, VOCAB, "time", Sampling(length=5), precision="fp16"))
    assert len(list(generate(net, VOCAB, "time", Sampling(length=5), precision="auto"))) == 5  # auto: this device's choice


def test_the_prime_is_read_before_the_prefix_and_left_out_of_the_text() -> None:
    net = lively_model(VOCAB)
    prime = "the time machine\n\n"
    primed = complete(net, VOCAB, "t", 40, prime=prime)
    assert primed == complete(net, VOCAB, prime + "t", 40)[len(prime) :]
    assert primed != complete(net, VOCAB, "t", 40)  # the context changes the continuation


# ---- min-p ----------------------------------------------------------------------------------------


def test_min_p_0_equals_plain_sampling() -> None:
    net = lively_model(VOCAB, layers=2)
    for seed in (0, 1, 2):
        plain = sample(net, "time", 80, temperature=1.0, seed=seed)
        assert sample(net, "time", 80, temperature=1.0, seed=seed, min_p=0.0) == plain
        assert sample(net, "time", 80, temperature=1.0, top_k=6, top_p=0.9, seed=seed, min_p=0.0) == sample(
            net, "time", 80, temperature=1.0, top_k=6, top_p=0.9, seed=seed
        )


def test_choose_next_samples_only_characters_at_least_min_p_times_the_likeliest() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)  # softmax: 0.636, 0.234, 0.086, 0.032, 0.012
    chosen = lambda min_p: set(choose_next(logits, Sampling(temperature=1.0, min_p=min_p, seed=0)).tolist())  # noqa: E731
    assert chosen(0.3) == {0, 1}  # floor 0.191: 0.234 stays, 0.086 goes
    assert chosen(0.1) == {0, 1, 2}  # floor 0.064
    assert chosen(0.01) == {0, 1, 2, 3, 4}  # floor 0.006
    # temperature first: at T = 2 the probabilities are flatter (0.43, 0.26, 0.16, ...), so 0.3 keeps three
    assert set(choose_next(logits, Sampling(temperature=2.0, min_p=0.3, seed=0)).tolist()) == {0, 1, 2}


def test_min_p_1_is_greedy() -> None:
    net = lively_model(VOCAB)
    assert sample(net, "time", 50, temperature=1.5, min_p=1.0, seed=0) == complete(net, VOCAB, "time", 50)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"min_p": 1.5}, "min_p must lie in [0.0, 1.0]"),
        ({"top_p": -0.1}, "top_p must lie"),
        ({"stop": ("",)}, "a stop string must not be empty"),
        ({"num_samples": 2**64}, "num_samples must lie in [1, 9223372036854775807]"),  # an internal error (OverflowError) making its lists
        ({"length": 2**63}, "length must lie in [0, 9223372036854775807]"),
        # a library caller's wrong type: refused by name, not a TypeError or RuntimeError from deep in a step
        ({"length": 2.5}, "length must be an int, not 2.5"),
        ({"length": "5"}, "length must be an int, not '5'"),
        ({"num_samples": 2.0}, "num_samples must be an int, not 2.0"),
        ({"seed": 1.5}, "seed must be an int, not 1.5"),
        ({"temperature": "1"}, "temperature must be a float, not '1'"),
        ({"top_k": True}, "top_k must be an int, not True"),
        ({"stop": "ab"}, "stop must be a tuple of strings, not 'ab'"),  # else each character a stop string
        ({"stop": ("a", 1)}, "stop must be a tuple of strings"),
    ],
)
def test_bad_sampling_settings_are_refused_by_name(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        Sampling(**options)  # type: ignore[arg-type]


def test_sampling_takes_an_int_for_a_float_and_a_list_of_stop_strings_as_a_tuple() -> None:
    sampling = Sampling(temperature=1, top_p=1, stop=["ab", "c"])  # type: ignore[arg-type]
    assert sampling.stop == ("ab", "c") and hash(sampling) == hash(Sampling(temperature=1.0, stop=("ab", "c")))


# ---- stop strings ---------------------------------------------------------------------------------


def continuation(text: str, *stop: str, samples: int = 1) -> tuple[list[str], Continuation]:
    """Feed `text` through a Continuation with `stop` (every sample the same text), in chunks of
    3 steps; return what each step added to sample 0, and the Continuation."""
    steps = [[c] * samples for c in text]
    chunks = iter([steps[i : i + 3] for i in range(0, len(steps), 3)])
    cont = Continuation(chunks, stop, samples)
    return [chars[0] for chars in cont], cont


def test_a_stop_string_ends_the_sample_and_is_left_out() -> None:
    added, cont = continuation("abcabcab", "ca")
    assert "".join(added) == "ab" and cont.text == ["ab"] and cont.ended == ["ca"]
    assert added == ["a", "b", "", ""]  # "c" is held back until "a" shows it begins "ca"; then it ends
    assert cont.tokens == [list("abca")]  # what the model wrote, the stop string included


def test_text_held_back_is_released_once_it_cannot_begin_a_stop_string() -> None:
    added, cont = continuation("abcabd", "abd!")
    assert added == ["", "", "abc", "", "", "", "abd"]  # "abd" waits for a "!" that never comes: released at the end
    assert cont.text == ["abcabd"] and cont.ended == [None] and cont.tokens == [list("abcabd")]


def test_ended_where_they_are_the_steps_give_what_was_held_back() -> None:
    """The server's deadline: what a stop string held back comes out, as at the length."""
    steps = [[c] for c in "abcab"]
    cont = Continuation(iter([steps]), ("abd!",), 1)
    assert [chars[0] for chars in one_by_one(cont, 5)] == ["", "", "abc", "", ""]
    assert cont.end_here() == ["ab"] and cont.text == ["abcab"] and cont.ended == [None]
    assert next(cont, None) is None and cont.end_here() == [""]


def test_the_earliest_stop_string_wins() -> None:
    _, cont = continuation("xxabyyb", "yb", "aby", "b")
    assert cont.text == ["xxa"] and cont.ended == ["b"]
    _, cont = continuation("xxabyyb", "yb", "xab")
    assert cont.text == ["x"] and cont.ended == ["xab"]


def test_no_stop_string_passes_every_character_through() -> None:
    added, cont = continuation("hello world")
    assert added == list("hello world") and cont.ended == [None]


def test_stop_strings_on_a_model_cut_its_continuation_where_the_string_first_appears() -> None:
    net = lively_model(VOCAB, layers=2)
    options = {"temperature": 1.0, "seed": 4}
    tokens = [chars[0] for chars in generate(net, VOCAB, "time", Sampling(length=200, **options))]  # type: ignore[arg-type]
    full = "".join(tokens)  # (a token may be "<unk>")
    stop = full[40:42]  # two characters the model does write
    first = full.find(stop)
    stopped = generate(net, VOCAB, "time", Sampling(length=200, stop=(stop,), **options))  # type: ignore[arg-type]
    steps = list(stopped)
    assert "".join(chars[0] for chars in steps) == full[:first] == stopped.text[0]
    assert stopped.ended == [stop]
    made = next(n for n in range(len(tokens)) if stop in "".join(tokens[: n + 1]))
    assert len(steps) == made + 1 < 200  # the model stopped working at the stop string


def test_each_sample_ends_at_its_own_stop() -> None:
    net = lively_model(VOCAB)
    options = {"temperature": 1.0, "seed": 5, "num_samples": 3, "length": 120}
    plain = generate(net, VOCAB, "time", Sampling(**options))  # type: ignore[arg-type]
    list(plain)
    stopped = generate(net, VOCAB, "time", Sampling(**options, stop=("e",)))  # type: ignore[arg-type]
    list(stopped)
    for full, cut, ended in zip(plain.text, stopped.text, stopped.ended):
        assert cut == (full[: full.index("e")] if "e" in full else full)
        assert ended == ("e" if "e" in full else None)
    assert len({len(t) for t in stopped.text}) > 1  # the samples did end at different places


# ---- on a GPU: no wait for the device per character -------------------------------------------------


@pytest.mark.parametrize(("options", "kept"), [({}, 5), ({"top_k": 3}, 3), ({"top_p": 0.8}, 2), ({"min_p": 0.1}, 3)])
def test_a_draw_follows_the_probabilities_it_keeps(options: dict[str, object], kept: int) -> None:
    """20,000 draws from softmax([4, 3, 2, 1, 0]), cut: each kept character about as often as
    its share of the mass kept (within 5 standard deviations), the others never."""
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(20_000, 1)
    counts = torch.bincount(choose_next(logits, Sampling(temperature=1.0, seed=1, **options)), minlength=5)  # type: ignore[arg-type]
    probs = torch.softmax(logits[0], dim=-1)[:kept]
    expected = probs / probs.sum() * 20_000
    assert counts[kept:].sum() == 0
    assert ((counts[:kept] - expected).abs() <= 5 * expected.sqrt() + 1).all()


def test_top_p_0_and_a_temperature_tiny_in_float_terms_are_greedy() -> None:
    """Issue 27, finding 17: top-p 0 kept nothing (then "<unk>", id 0, every step), and 1e-40
    overflowed logits / T to NaN; the most likely character always stays."""
    net = lively_model(VOCAB)
    greedy = complete(net, VOCAB, "time", 60)
    assert sample(net, "time", 60, temperature=1.0, top_p=0.0, seed=0) == greedy
    for tiny in (1e-40, 1e-45, 5e-324):
        assert sample(net, "time", 60, temperature=tiny, seed=0) == greedy
    logits = torch.tensor([[-1.0, 3.0, 2.9], [0.0, -5.0, 7.0]])
    assert choose_next(logits, Sampling(temperature=1e-40, seed=0)).tolist() == [1, 2]


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "compiled"])
def test_each_row_chooses_what_it_chooses_alone_whoever_shares_its_batch(compiled: bool) -> None:
    """Rows with different settings and seeds, together: each row's ids are those it gets in a
    batch of its own, through several blocks of its stream, as rows leave and others join."""
    if compiled and not native.usable():
        pytest.skip(f"the compiled choice cannot run here: {native.status()}")
    torch.manual_seed(0)
    settings = [
        Sampling(temperature=1.0, seed=1),
        Sampling(),
        Sampling(temperature=0.7, top_k=4, seed=2),
        Sampling(temperature=1.3, top_p=0.9, min_p=0.05, seed=3),
    ]
    logits = torch.randn(3 * BLOCK, len(settings), 12) * 2  # (steps, rows, vocab)
    starts, alone = (0, 0, 10, 40), []
    for i, sampling in enumerate(settings):
        rows = Rows(compiled=compiled)
        rows.add(sampling)
        alone.append([rows.choose(logits[t, i : i + 1]).item() for t in range(starts[i], len(logits))])
    together, members = Rows(compiled=compiled), [0, 1]  # rows 0 and 1 start; 1 leaves at step 20; 2 joins at 10, 3 at 40
    together.add(settings[0])
    together.add(settings[1])
    made: dict[int, list[int]] = {0: [], 1: [], 2: [], 3: []}
    for t in range(len(logits)):
        if t == 10 or t == 40:
            together.add(settings[2 if t == 10 else 3])
            members.append(2 if t == 10 else 3)
        if t == 20:
            together.keep([0, 2])
            members.remove(1)
        for i, chosen in zip(members, together.choose(logits[t, members]).tolist()):
            made[i].append(chosen)
    assert made[0] == alone[0] and made[1] == alone[1][:20]
    assert made[2] == alone[2][: len(logits) - 10] and made[3] == alone[3][: len(logits) - 40]


CHOICES = [
    Sampling(temperature=1.0, seed=1),
    Sampling(temperature=0.5, top_k=3, seed=2),
    Sampling(temperature=1.0, top_p=0.9, seed=3),
    Sampling(temperature=2.0, min_p=0.1, seed=4),
    Sampling(temperature=0.8, top_k=10, top_p=0.5, min_p=0.02, seed=5),
    Sampling(temperature=1e-30, seed=6),
    Sampling(temperature=1.0, top_p=0.0, seed=7),
    Sampling(),
]


@pytest.mark.parametrize("vocab", [5, 28, 300])
def test_the_compiled_choice_is_the_torch_choice(vocab: int) -> None:
    """csrc/choosing.cpp chooses what choosing.py's torch pass chooses, row by row and step by
    step, for every kind of cut, with ties among the logits (the first in vocabulary order wins)."""
    if not native.usable():
        pytest.skip(f"the compiled choice cannot run here: {native.status()}")
    torch.manual_seed(0)
    logits = (torch.randn(2 * BLOCK, len(CHOICES), vocab) * 3).round(decimals=1)  # rounded: many ties
    made = []
    for compiled in (False, True):
        rows = Rows(compiled=compiled)
        for sampling in CHOICES:
            rows.add(sampling)
        made.append(torch.stack([rows.choose(step) for step in logits]))
    assert torch.equal(made[0], made[1])


def test_the_compiled_choice_gives_a_nan_logit_no_weight() -> None:
    if not native.usable():
        pytest.skip(f"the compiled choice cannot run here: {native.status()}")
    logits = torch.tensor([[float("nan"), 0.0, 0.0, -1e30]]).repeat(200, 1)
    assert set(choose_next(logits, Sampling(temperature=1.0, seed=0)).tolist()) == {1, 2}


def test_sample_i_of_several_is_what_seed_plus_i_gives_alone() -> None:
    net = lively_model(VOCAB)
    together = generate(net, VOCAB, "time", Sampling(length=60, temperature=1.0, num_samples=3, seed=7))
    texts = ["".join(c) for c in zip(*together)]
    assert texts == [sample(net, "time", 60, temperature=1.0, seed=7 + i)[4:] for i in range(3)]


def test_a_prime_and_a_long_prefix_are_read_once_for_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prime (and a prefix past READ_BY_STEPS) is the same for every sample: read by one
    forward of one row, which each sample copies. Read a row a sample, 10,000 samples of the
    Shakespeare 1×768 model asked for 39 GB; and each sample is still what it is alone."""
    net, context, prefix = lively_model(VOCAB), list("the time machine " * 8), "time traveller " * 2
    assert len(prefix) > READ_BY_STEPS
    rows_read: list[int] = []
    real_read = generate_mod.read
    monkeypatch.setattr(
        generate_mod,
        "read",
        lambda model, vocab, tokens, state, precision="fp32": rows_read.append(state[0].shape[1]) or real_read(model, vocab, tokens, state, precision),
    )
    together = generate(net, VOCAB, prefix, Sampling(length=40, temperature=1.0, num_samples=5, seed=3), context)
    texts = ["".join(c) for c in zip(*together)]
    assert rows_read == [1, 1]  # the prime, then the prefix: one row each
    alone = ["".join(c[0] for c in generate(net, VOCAB, prefix, Sampling(length=40, temperature=1.0, seed=3 + i), context)) for i in range(5)]
    assert texts == alone


@pytest.mark.parametrize("cell", cells.NAMES)
def test_a_row_that_joins_or_leaves_a_batch_steps_exactly_as_it_steps_alone(cell: str) -> None:
    """The compiled step's product gives a row the same bits whatever the batch around it."""
    net = lively_model(VOCAB, cell=cell, layers=2)
    contexts = [list("the time"), list("a traveller"), list("it")]
    with torch.inference_mode():
        alone = []
        for context in contexts:
            step, last = prime(net, VOCAB, context)
            X, logits = last, []
            for _ in range(12):
                logits.append(step(X).clone())
                X = logits[-1].argmax(dim=-1)
            alone.append(logits)
        batch, X = prime(net, VOCAB, contexts[0])
        made: list[list[torch.Tensor]] = [[], [], []]
        members = [0]
        for t in range(12):
            if t in (3, 5):  # rows 1 and 2 join
                joining, first = prime(net, VOCAB, contexts[1 if t == 3 else 2])
                batch.extend(joining)
                X = torch.cat([X, first])
                members.append(1 if t == 3 else 2)
            if t == 8:  # row 0 leaves
                batch.keep([1, 2])
                X, members = X[1:], members[1:]
            logits = batch(X).clone()
            for i, row in zip(members, logits):
                made[i].append(row[None])
            X = logits.argmax(dim=-1)
    assert all(torch.equal(a, b) for a, b in zip(made[0], alone[0][:8]))
    assert all(torch.equal(a, b) for a, b in zip(made[1], alone[1][:9]))
    assert all(torch.equal(a, b) for a, b in zip(made[2], alone[2][:7]))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cell", cells.NAMES)
def test_a_compiled_chunk_of_samples_is_a_step_and_a_choice_at_a_time(cell: str, precision: str) -> None:
    """`Stepper.sample` (the steps and choices of a chunk in one compiled call) makes the ids a
    step and a choice a character make, for every kind of cut, in chunks that run across the
    rows' blocks of uniforms, as rows leave and join between chunks."""
    if not native.usable():
        pytest.skip(f"the compiled step cannot run here: {native.status()}")
    net = lively_model(VOCAB, cell=cell, layers=2)
    made = []
    with torch.inference_mode():
        for chunked in (True, False):
            step, X = prime(net, VOCAB, list("the time"), len(CHOICES), precision)
            assert isinstance(step, Stepper) and step.compiled
            rows = Rows()
            for sampling in CHOICES:
                rows.add(sampling)
            ids = []
            for n in (1, 16, BLOCK, 7, BLOCK - 3, 40):  # past the first block, then the second
                chosen = step.sample(X, n, rows) if chunked else sample_each(step, X, n, rows)
                ids.append(chosen)
                X = chosen[-1]
                if n == 7:  # rows 1 and 4 leave, a row of the first's settings joins
                    step.keep([0, 2, 3, 5, 6, 7])
                    rows.keep([0, 2, 3, 5, 6, 7])
                    joining, first = prime(net, VOCAB, list("it"), 1, precision, like=step)
                    step.extend(joining)  # type: ignore[arg-type]
                    rows.add(CHOICES[0])
                    X = torch.cat([X[[0, 2, 3, 5, 6, 7]], first])
            made.append(ids)
    assert all(torch.equal(a, b) for a, b in zip(*made))


def test_one_samples_steps_are_shared_so_a_character_makes_no_object() -> None:
    tokens = ["<unk>", "a", "b"]
    steps = alone(tokens)
    chunk = decoded(torch.tensor([[1], [2], [1]]), tokens, steps)  # (steps, rows): one row
    assert chunk == [("a",), ("b",), ("a",)] and chunk[0] is chunk[2] is steps[1]
    assert decoded(torch.tensor([[1, 2], [2, 2]]), tokens, steps) == [["a", "b"], ["b", "b"]]  # several rows: a step each
    continuation = Continuation(iter([chunk]), (), 1)
    assert list(continuation) == chunk and continuation.text == ["aba"] and continuation.tokens == [["a", "b", "a"]]


def test_a_chunk_asks_for_at_most_a_block_of_draws() -> None:
    rows = Rows()
    rows.add(Sampling(temperature=1.0, seed=0))
    with pytest.raises(ValueError, match="a chunk of 1 to"):
        rows.settings(BLOCK + 1)


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 3}, {"num_samples": 4, "temperature": 1.0, "seed": 5}],
    ids=["greedy", "sampled", "batch"],
)
def test_on_a_gpu_the_ids_come_back_a_chunk_at_a_time_and_the_text_is_the_same(monkeypatch: pytest.MonkeyPatch, core: str, options: dict[str, object]) -> None:
    """The path a GPU takes (ids kept on the device, `ids_on_host` False), counted on a CPU:
    at most one read back per chunk of characters, after the prefix's; the same text as the
    CPU's path."""
    net = lively_model(VOCAB, core, layers=2)
    sampling = Sampling(length=3 * CHUNK + 5, **options)  # type: ignore[arg-type]
    on_cpu = list(generate(net, VOCAB, "the time", sampling))
    as_on_a_gpu(monkeypatch)
    monkeypatch.setattr(generate_mod, "ids_on_host", lambda device, num_samples: False)
    steps = generate(net, VOCAB, "the time", sampling)
    first = next(steps)  # the prefix read, the first chunk made and read back
    with host_syncs() as seen:
        rest = list(steps)
    assert [first, *rest] == on_cpu
    assert len(seen) <= 3  # the three chunks after the first: 32, 32 and 5 characters


def test_the_command_line_and_the_api_offer_each_sampling_field_with_its_bounds() -> None:
    """Sampling is the one declaration: `lstmlm generate` has an option per field, and the
    HTTP request a field per field (but num_samples: a request is one continuation), each
    with Sampling's default, bounds and help."""
    import dataclasses
    import inspect
    from typing import get_args

    from lstmlm.cli.generate import generate as command

    from support.cli import cli

    help_text = cli("generate", "--help").stdout
    options = {name: get_args(p.annotation)[1] for name, p in inspect.signature(command).parameters.items()}
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from lstmlm.serve.bodies import GenerateRequest

    schema = GenerateRequest.model_json_schema()["properties"]
    for f in dataclasses.fields(Sampling):
        flag, option = f"--{f.name.replace('_', '-')}", options[f.name]
        assert flag in help_text and flag in (option.default, *option.param_decls) and option.help.startswith(f.metadata["help"].removesuffix(").").rstrip("."))
        if f.name != "stop":
            assert (option.min, option.max) == (f.metadata["low"], f.metadata["high"])
        if f.name == "num_samples":
            assert f.name not in schema
            continue
        field = schema[f.name]
        assert field["description"] == f.metadata["help"]
        if f.metadata["low"] is not None and f.name != "seed":
            assert field["minimum"] == f.metadata["low"] and field.get("maximum") == f.metadata["high"]
        if f.name not in ("stop", "seed"):
            assert field["default"] == f.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_primed_together_from_a_state_are_each_the_row_primed_alone(dtype: torch.dtype) -> None:
    """`--num-samples N --seed S`: sample i is what `--seed S+i` gives alone. The rows primed
    together from a read state (a context longer than READ_BY_STEPS) start from the bits of the
    row primed alone: the stepper's first product, [H_0, 1] W, taken at batch 7 and 64 by torch's
    product, rounded otherwise than at batch 1 (the last bit of the first logits)."""
    if not native.usable():
        pytest.skip(f"the compiled step cannot run here: {native.status()}")
    torch.manual_seed(0)
    net = CharLM(len(VOCAB), num_hiddens=40, num_layers=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    context = list(synthetic_text(5, seed=3)[: READ_BY_STEPS + 10])
    precision = "fp32" if dtype == torch.float32 else "bf16"
    with torch.inference_mode():
        one, first = prime(net, VOCAB, context, 1, precision)
        assert isinstance(one, Stepper) and one.compiled
        alone_P = [P.clone() for P in one.P]
        alone_logits = one(first.tolist()).clone()
        for rows in (7, 64):
            together, last = prime(net, VOCAB, context, rows, precision)
            assert all(torch.equal(P[i], P1[0]) for P, P1 in zip(together.P, alone_P) for i in range(rows))
            logits = together(last)
            assert all(torch.equal(logits[i], alone_logits[0]) for i in range(rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_of_a_compiled_batch_has_its_own_bits_whatever_the_batch_and_its_split(dtype: torch.dtype) -> None:
    """The compiled product shares its columns between the cores by strips, a single row's by
    panels: at every batch (a last block of rows of 1 to 6, columns ending in a part panel) each
    row's logits are the bits it gets alone, and torch's product to float rounding."""
    if not native.usable():
        pytest.skip(f"the compiled step cannot run here: {native.status()}")
    torch.manual_seed(0)
    net = CharLM(len(VOCAB), num_hiddens=40, num_layers=2).eval()  # each layer reads H into 4·40 + 28 or 4·40 + 40 columns: part panels
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    for batch in (2, 7, 13, 64):
        ids = torch.arange(batch) % len(VOCAB)
        together = Stepper(net, net.begin_state(batch, torch.device("cpu")), dtype, compiled=True)
        python = Stepper(net, net.begin_state(batch, torch.device("cpu")), dtype, compiled=False)
        rows = [Stepper(net, net.begin_state(1, torch.device("cpu")), dtype, compiled=True) for _ in range(batch)]
        X = ids
        for _ in range(3):
            logits = together(X).clone()
            assert all(torch.equal(logits[i], row(X[i : i + 1])[0]) for i, row in enumerate(rows))
            torch.testing.assert_close(logits.float(), python(X).float(), **({} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}))
            X = logits.argmax(dim=-1)
