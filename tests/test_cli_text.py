"""What counts as text with something to read: captions, typed queries and the server's text
queries all use ``cli.has_visible_text``."""

import argparse

import pytest

from crossmodal.cli import has_visible_text, non_blank_text

VISIBLE = ["a dog", "é", "e\u0301", "猫", "🙂", "3", "?", " \u200b x \u200b", "\u05d0"]
BLANK = ["", " ", "\t\n", "\u00a0", "\u3000", "\u200b", "\ufeff", "\u200e\u200f", "\u0301", "\u0301\u0300\u20dd",
         "\x00", "\U000e0041", "\ue000", "\u2028\u2029"]


@pytest.mark.parametrize("text", VISIBLE)
def test_visible(text):
    assert has_visible_text(text)
    assert non_blank_text()(text) == text


@pytest.mark.parametrize("text", BLANK)
def test_blank_or_invisible(text):
    assert not has_visible_text(text)
    with pytest.raises(argparse.ArgumentTypeError, match="no visible character"):
        non_blank_text()(text)


@pytest.mark.parametrize("value", [None, 3, 2.5, ["a"], {"a": 1}, b"abc"])
def test_only_strings_are_text(value):
    assert not has_visible_text(value)
