"""``python -m patchlens.run`` / ``accelerate launch -m patchlens.run RECIPE DATA --out DIR``."""

import sys

from patchlens.run.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
