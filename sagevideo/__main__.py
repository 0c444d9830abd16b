"""``python -m sagevideo``: the same command line as the ``sagevideo`` console script."""

import sys

from sagevideo.cli import main

if __name__ == "__main__":
    sys.exit(main())
