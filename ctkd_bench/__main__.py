"""``python -m ctkd_bench`` (and ``accelerate launch -m ctkd_bench run ...`` for several GPUs)."""

import sys

from ctkd_bench.cli import main

sys.exit(main())
