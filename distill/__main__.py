"""``python -m distill``: the ``distill`` command line (an entry point: nothing imports it)."""

import sys

from kd_recipes.cli import distill_main

sys.exit(distill_main())
