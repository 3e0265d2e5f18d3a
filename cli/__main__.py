"""`python -m cli`: the same as the `safesteer` command."""

from cli import main

raise SystemExit(main())
