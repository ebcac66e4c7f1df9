"""``python -m localmed``: the same as the ``localmed`` command."""

from __future__ import annotations

import sys

from localmed.cli import main

sys.exit(main())
