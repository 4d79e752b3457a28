"""`python -m canary.demo`: the same as `canary demo`."""

import sys

from canary.demo import main

sys.exit(main())
