"""``python -m data_gen``: the ``data-gen`` command line (an entry point: nothing imports it)."""

import sys

from kd_recipes.cli import data_gen_main

sys.exit(data_gen_main())
