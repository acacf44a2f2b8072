"""``python -m distill.cli`` is the same as ``darht``."""

from distill.cli import main

raise SystemExit(main())
