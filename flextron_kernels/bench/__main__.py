"""``python -m flextron_kernels.bench``: the same as ``flextron bench``."""

import sys

from flextron_kernels.cli import bench_main

sys.exit(bench_main())
