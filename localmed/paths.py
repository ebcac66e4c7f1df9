"""Where localmed keeps its files. Paths come from functions; nothing is created at import.

``LOCALMED_DATA_DIR`` and ``LOCALMED_CONFIG_DIR`` override the platform folders (tests and
shared workstations use them).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "localmed"


def data_dir() -> Path:
    """Folder for models, transcripts and bench results (their names: :mod:`localmed.library`)."""
    if env := os.environ.get("LOCALMED_DATA_DIR"):
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    """Folder for the user's own configuration (``models.toml`` overrides)."""
    if env := os.environ.get("LOCALMED_CONFIG_DIR"):
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def user_registry_path() -> Path:
    """The user's models.toml, whose entries add to or override the built-in registry."""
    return config_dir() / "models.toml"

