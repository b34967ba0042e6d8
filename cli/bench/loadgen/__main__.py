"""``python -m cli.bench.loadgen``: the load generator without the ``tailledger`` wrapper."""

import sys

from .main import loadgen_main

sys.exit(loadgen_main(sys.argv[1:]))
