import pytest

from mpsearch.errors import MPSearchError
from mpsearch.quant import Budget


@pytest.mark.parametrize(
    "text, unit, value",
    [("4.0bpw", "bpw", 4.0), ("2.5 bpw", "bpw", 2.5), ("5.2MiB", "mib", 5.2), ("5000000", "bytes", 5e6), (123456, "bytes", 123456.0)],
)
def test_parse(text, unit, value):
    assert Budget.parse(text) == Budget(unit, value)


@pytest.mark.parametrize("text", ["", "4 bits", "-3bpw", "0MiB", "MiB", True])
def test_unreadable_or_non_positive_budgets_are_refused(text):
    with pytest.raises(MPSearchError, match="budget"):
        Budget.parse(text)


def test_round_trips_through_its_string_form():
    for text in ("4bpw", "5.2MiB", "5000000"):
        assert str(Budget.parse(text)) == text
