"""`python -m cwm_jax.convert ...`: the same as `cwm-convert ...`."""

import sys

from cwm_jax.convert.cli import main

sys.exit(main())
