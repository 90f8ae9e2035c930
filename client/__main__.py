"""`python -m longscribe.client`: the same as the `longscribe` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
