"""Assertions shared by the tests of the one-line error messages."""


def assert_one_line(err: BaseException, *parts: str) -> None:
    """``err`` shows as one line without a chained traceback, naming every one of ``parts``."""
    message = str(err)
    assert "\n" not in message, message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    for part in parts:
        assert part in message, (part, message)
