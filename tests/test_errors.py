"""PdsError's message hygiene and the one helper that quotes other libraries' errors."""

from pdscli.errors import PdsError, first_line


def test_first_line_keeps_one_line_cut_to_the_limit():
    assert first_line(ValueError("  bad value\nTraceback follows\n")) == "bad value"
    assert first_line(OSError("x" * 500), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"  # no message: the type says what happened


def test_pds_error_strips_escape_codes_and_blank_lines():
    assert str(PdsError("\n\x1b[31mred\x1b[0m text\n")) == "red text"
