"""Option value types and actions of the ``flatlens`` command's parser.

Each type turns the text of one option into its value or raises
``argparse.ArgumentTypeError`` with a one-line reason (a usage error, exit code 2, before any
data is loaded); the actions handle deprecated and explicitly given options.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from flatlens.core._checks import (
    check_fraction,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_rho,
)

_INT_MAX = 2**63 - 1  # the largest int64: torch's sizes, counts and seeds fit below it


def _int_at_least(least: int, what: str = "an integer") -> Callable[[str], int]:
    """An option type: an integer >= ``least`` and at most the largest int64."""

    def parse(text: str) -> int:
        try:
            value = check_positive_int("value", int(text), least)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {least}, got {text!r}") from None
        if value > _INT_MAX:
            raise argparse.ArgumentTypeError(
                f"expected {what} from {least} to 2**63 - 1 = {_INT_MAX}, got {text!r}"
            )
        return value

    return parse


def _checked_float(check: Callable[[str, float], float], what: str) -> Callable[[str], float]:
    """An option type: a float that passes ``check`` (a ``flatlens.core._checks`` check),
    refused as "expected <what>" otherwise."""

    def parse(text: str) -> float:
        try:
            return check("value", float(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


_positive_float = _checked_float(check_positive, "a finite number > 0")
_nonnegative_float = _checked_float(check_nonnegative, "a finite number >= 0")
_fraction = _checked_float(check_fraction, "a number in [0, 1]")


def _grid_points(text: str) -> int:
    """An option type: 0 (skip) or an integer >= 2."""
    value = _int_at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected 0 (skip) or at least 2 grid points, got 1")
    return value


def _rhos(text: str) -> tuple[float, ...]:
    """An option type: radii > 0 separated by commas."""
    try:
        return tuple(check_rho(float(v)) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes finite radii > 0 separated by commas, like 0.01,0.05; got {text!r}"
        ) from None


def _samples(text: str) -> int | None:
    """An option type: a number of examples >= 1, or ``all`` (None)."""
    if text == "all":
        return None
    return _int_at_least(1)(text)


def _names(text: str) -> list[str]:
    """An option type: names separated by commas."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, like sgd,sam,gam")
    return names


def _seeds(text: str) -> list[int]:
    """An option type: distinct seeds in [0, 2**63 - 1] separated by commas."""
    try:
        seeds = [check_positive_int("seed", int(v), 0) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or max(seeds) > _INT_MAX:
        raise argparse.ArgumentTypeError(
            f"expected distinct integers from 0 to 2**63 - 1 separated by commas, like 0,1,2; "
            f"got {text!r}"
        )
    return seeds


class _Deprecated(argparse.Action):
    """An old flag that still works for one release: it stores its value under the new
    flag's destination and prints one line naming the new flag."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: object) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        import sys

        from flatlens.core._renames import REMOVED_IN

        print(
            f"{parser.prog}: {option_string} is deprecated and stops working in flatlens "
            f"{REMOVED_IN}: use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)
        namespace._deprecated = [*getattr(namespace, "_deprecated", []), option_string]


class _Given(argparse.Action):
    """Store the value and note that the flag was given (``namespace._given``), for flags
    whose default an older, broader flag may replace."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace._given = [*getattr(namespace, "_given", []), self.dest]


def _bytes(text: str) -> float:
    """A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024), e.g.
    3G, 3GiB, 500M or 2e9; at least one byte."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(?:([KMGT])(?:I?B)?|B)?\s*", text.upper())
    try:
        value = float(match.group(1)) * units[match.group(2) or ""] if match else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(
            f"expected a size such as 3G, 500M or 2e9 (bytes), got {text!r}"
        )
    return value
