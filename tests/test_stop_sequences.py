"""Stop sequences: matched in the streamed text, never partly streamed, cut or kept as asked."""

from __future__ import annotations

import pytest

from ecserve.config import EngineConfig
from ecserve.engine.llm import LLM
from ecserve.engine.stop import StopMatcher
from ecserve.types import FinishReason, SamplingParams


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stop = matcher.feed(piece)
        out.append(text)
        if stop is not None:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


@pytest.mark.parametrize("pieces", [["hello wor", "ld!"], list("hello world!"), ["hello world!"]])
def test_stop_found_across_pieces_and_cut(pieces):
    assert feed_all(StopMatcher(["world"], include=False), pieces) == ("hello ", "world")
    assert feed_all(StopMatcher(["world"], include=True), pieces) == ("hello world", "world")


def test_a_possible_start_is_held_back_then_released():
    m = StopMatcher(["STOP"], include=False)
    assert m.feed("abST") == ("ab", None)  # "ST" could begin STOP
    assert m.feed("x") == ("STx", None)  # it did not
    assert m.feed("S") == ("", None)
    assert m.flush() == "S"


def test_earliest_match_wins_then_longest():
    assert feed_all(StopMatcher(["c", "abc"], include=True), ["xabcd"]) == ("xabc", "abc")
    assert feed_all(StopMatcher(["bc", "ab"], include=False), ["xabc"]) == ("x", "ab")


def test_no_match_before_it_may_stop_but_one_straddling_is_found():
    m = StopMatcher(["ab"], include=False)
    assert m.feed("ab", can_stop=False) == ("ab", None)  # wholly too early: ignored
    assert m.feed("xa", can_stop=False) == ("x", None)  # "a" held: it may yet count
    assert m.feed("b", can_stop=True) == ("", "ab")


def test_streamed_text_never_contains_part_of_the_stop():
    stop = "the end"
    m = StopMatcher([stop], include=False)
    streamed = ""
    for ch in "it was nearly the en... but the end came":
        text, hit = m.feed(ch)
        streamed += text
        assert not any(streamed.endswith(stop[:k]) for k in range(1, len(stop)))
        if hit:
            break
    assert streamed == "it was nearly the en... but " and hit == stop


@pytest.fixture
def llm(make_model) -> LLM:
    return LLM(make_model(), EngineConfig(device="cpu"))


# Sampled with a fixed seed: the tiny random model's greedy text repeats one character.
SAMPLED = {"max_new_tokens": 24, "ignore_eos": True, "temperature": 1.0, "seed": 1}


def test_engine_stops_on_a_sequence_from_its_own_output(llm):
    free = llm.generate("hello world", SamplingParams(**SAMPLED))[0]
    # A stop sequence taken from the middle of the unconstrained output ends it right there.
    stop = free.text[7:10]
    end = free.text.index(stop) + len(stop)
    assert free.text[:end].isascii() and len(set(free.text[:end])) > 2, free.text
    cut, kept = llm.generate(["hello world", "hello world"], [
        SamplingParams(**SAMPLED, stop_sequences=(stop,)),
        SamplingParams(**SAMPLED, stop_sequences=("\x00nope", stop), include_stop_sequence=True),
    ])
    assert cut.finish_reason is kept.finish_reason is FinishReason.STOP_SEQUENCE
    assert cut.text == free.text[:end - len(stop)]
    assert kept.text == free.text[:end]
    # Every token generated is reported, up to the one that completed the stop sequence.
    assert cut.token_ids == kept.token_ids == free.token_ids[:end]


def test_min_new_tokens_delays_stop_sequences(llm):
    free = llm.generate("hello world", SamplingParams(**SAMPLED))[0]
    stop = free.text[0]
    last = max(i for i, ch in enumerate(free.text) if ch == stop)
    assert free.text.isascii() or last < free.text.index("\ufffd"), free.text
    early, late = llm.generate(["hello world"] * 2, [
        SamplingParams(**SAMPLED, stop_sequences=(stop,)),
        SamplingParams(**SAMPLED, stop_sequences=(stop,), min_new_tokens=last + 2),
    ])
    assert early.finish_reason is FinishReason.STOP_SEQUENCE and early.text == ""
    assert late.finish_reason is FinishReason.LENGTH and late.text == free.text


def test_stop_sequences_validated():
    with pytest.raises(ValueError, match="stop_sequences"):
        SamplingParams(stop_sequences=("",))


def test_text_is_complete_when_no_stop_matches(llm):
    plain = llm.generate("hello world", SamplingParams(**SAMPLED))[0]
    never = llm.generate("hello world", SamplingParams(**SAMPLED, stop_sequences=("\x00x",)))[0]
    assert never.text == plain.text and never.finish_reason is FinishReason.LENGTH


def test_stepping_llm_gives_text_and_stops_the_engine_alone_does_not(llm):
    """LLM.add_request/step run the text stage over the engine, as a server's front end does;
    the engine itself steps token ids only and never ends a request on a stop sequence."""
    from ecserve.types import Request

    free = llm.generate("hello world", SamplingParams(**SAMPLED))[0]
    stop = free.text[7:10]
    params = SamplingParams(**SAMPLED, stop_sequences=(stop,))
    ids = tuple(llm.engine.encode("hello world"))
    llm.add_request(Request("stepped", ids, params))
    events = []
    while llm.engine.has_unfinished():
        events += llm.step()
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE and events[-1].detail == stop
    assert "".join(e.text for e in events) == free.text[:free.text.index(stop)]
    assert llm.text._streams == {}  # nothing left behind

    llm.engine.add_request(Request("raw", ids, params))
    raw = []
    while llm.engine.has_unfinished():
        raw += llm.engine.step()
    assert [e.token_id for e in raw] == free.token_ids  # past the stop: it is not the engine's
    assert all(e.text == "" for e in raw) and raw[-1].finish_reason is FinishReason.LENGTH
