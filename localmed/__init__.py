"""localmed: open medical LLMs on an offline clinician's laptop."""

from __future__ import annotations

__version__ = "0.1.0"
