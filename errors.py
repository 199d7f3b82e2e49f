"""kvnest's error type and the one-line-error CLI that every script runs under.

A user error (a missing file, a ratio outside (0, 1], a checkpoint for another model) is a `KVNestError` whose
message names the problem and the fix; model.py raises its own `ModelError` (a sequence longer than its cache: it
imports nothing of kvnest, so that it can be copied alone). Scripts print either as one line, `error: ...`, and
exit with status 2; so do bad flags, through `Parser`, whose argument types below check a value once for every
script that uses them.
"""
import argparse
import math
import sys

from model import ModelError


class KVNestError(ValueError):
    """A user error with a one-line message that names the problem and the fix; scripts print it and exit 2."""


USER_ERRORS = (KVNestError, ModelError)

# transformers 5.25 imports a PyPI package named `kernels` at start; kvnest's kernels.py, first on the path, shadows it
INSTALL_TRANSFORMERS = ("pip install 'transformers>=5,<5.25' (5.25 imports a package named kernels, which kvnest's "
                        "kernels.py shadows)")


def run_cli(main_fn) -> None:
    """Run a script's main, turning a user error into one line on stderr and exit status 2."""
    try:
        main_fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with its errors (an unknown flag, a bad value) as one line, `error: ...`, and exit status 2."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def check_ratio(value: float, what: str, example: str = "0.5") -> float:
    """A fraction in (0, 1], such as a budget or a keep ratio."""
    if not 0 < value <= 1:  # also refuses NaN
        raise KVNestError(f"{what} {value} is outside (0, 1]; pass a fraction such as {example}")
    return value


def ratio(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]; pass a fraction such as 0.5")
    return value


def ratios(text: str) -> list:
    """argparse type: comma-separated fractions in (0, 1], such as 0.25,0.5."""
    return [ratio(x) for x in text.split(",")]


def number(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def nonnegative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def count(text: str, least: int = 1) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be >= {least}")
    return value


def size(text: str) -> int:
    """argparse type: a whole number >= 0."""
    return count(text, least=0)


def integers(text: str, flag: str, least: int = 1) -> list:
    """A comma-separated list of whole numbers >= least (a flag such as --contexts 1024,4096)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least:
        raise KVNestError(f"{flag} {text!r}: pass whole numbers >= {least}, separated by commas")
    return values
