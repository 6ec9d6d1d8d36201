"""Word error rate with jiwer, after Whisper's English normaliser (vendored spelling table)."""

from __future__ import annotations

import pytest

from potstill.metrics import normalize_english, wer


@pytest.mark.parametrize(("text", "expected"), [
    ("Hello, World!", "hello world"),                                  # case, punctuation
    ("I won't go; it's twenty-five dollars.", "i will not go it is $25"),  # contractions, numbers, currency
    ("We'll see; they've gone.", "we will see they have gone"),
    ("the 1st and the second", "the 1st and the 2nd"),                 # ordinals
    ("Mr. Smith, um, said so", "mister smith said so"),                # titles, fillers
    ("[laughs] Yes (inaudible).", "yes"),                              # bracketed non-speech
    ("Analyse the colour of the centre", "analyze the color of the center"),  # the vendored spelling table
    ("  several   spaces\there ", "several spaces here"),
])
def test_whisper_english_normaliser(text, expected):
    assert normalize_english(text) == expected


def test_wer_against_hand_counted_errors():
    references = ["the cat sat on the mat", "hello world", "a b c d"]
    hypotheses = ["the cat sat on mat", "hello there world", "a x c"]
    # 6 + 2 + 4 = 12 reference words; errors: 1 deletion; 1 insertion; 1 substitution + 1 deletion
    assert wer(references, hypotheses) == pytest.approx(4 / 12)
    assert wer(references, references) == 0.0


def test_normalising_forgives_what_whisper_does_not_count():
    references = ["Hello, World! The colour is twenty-five, isn't it?"]
    hypotheses = ["hello world the color is 25 is not it"]
    assert wer(references, hypotheses) == 0.0
    # as written: "Hello," "World!" "The" "colour" "twenty-five," "isn't" "it?" differ, and one word more
    assert wer(references, hypotheses, normalize=False) == pytest.approx(8 / 8)


def test_an_empty_reference_counts_the_hypothesis_as_insertions():
    assert wer(["hmm.", "one word"], ["something", "one word"], normalize=True) == pytest.approx(1 / 2)  # "1 word"
    with pytest.raises(ValueError, match="the references hold no words after normalising"):
        wer(["Hmm.", "uh"], ["a", "b"])


def test_wer_input_checks():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="sequences of transcripts"):
        wer("a b", "a b")
