"""`python -m canary`: the same as the `canary` console script."""

from canary.cli.main import main

raise SystemExit(main())
