"""Selections the user types: workpiece types (``1,5,20-36``) and video names (``0001,0002``)."""

from __future__ import annotations

from lhtstream.base.errors import LhtstreamError

N_TYPES = 36  #: batch types in the data set, Type1..Type36


class SelectionError(LhtstreamError, ValueError):
    """A type or name selection that cannot be parsed; the message shows the accepted form."""


def parse_types(text: str | None) -> list[int] | None:
    """Parse a type selection like ``1,5,20-36`` into sorted unique ints (1..36)."""
    if text is None:
        return None
    types: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if lo > hi:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise SelectionError(f"bad type selection {text!r}: use e.g. 1,5,20-36") from None
        # checked before expanding, so '1-999999999' cannot build a huge set
        if lo < 1 or hi > N_TYPES:
            raise SelectionError(f"bad type selection {text!r}: types are 1..{N_TYPES}")
        types.update(range(lo, hi + 1))
    if not types:
        raise SelectionError(f"bad type selection {text!r}: types are 1..{N_TYPES}")
    return sorted(types)


def parse_names(text: str | None) -> list[str] | None:
    """Parse a comma-separated list of video names (``0001,0002``)."""
    if text is None:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]

