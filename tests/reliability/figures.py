"""Figures the reliability tests measure, printed in pytest's terminal summary (see conftest)."""

from __future__ import annotations

FIGURES: dict[str, str] = {}


def record(name: str, value: object) -> None:
    """Keep ``value`` to print under ``name`` when the session finishes (last one wins)."""
    FIGURES[name] = str(value)
