"""Flags that several commands share, each declared once."""

from __future__ import annotations

from crosscoders.cli.flags import Field, Option
from crosscoders.diff.categories import PRESETS
from crosscoders.model import CrosscoderConfig

NO_PROGRESS = Option("--no-progress", action="store_true", help="no progress bars")

#: names of the sources (train: default the store's source names; import: source_0, ...)
SOURCE_NAMES = Field(CrosscoderConfig, "source_names")

#: the category-threshold presets, as choices of a flag
PRESET_CHOICES = sorted(PRESETS)

JSON = Option("--json", help="also write the results as JSON to this file")
