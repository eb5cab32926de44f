"""`python -m service.batch`, kept for the scripts that call batch scoring by its old name: see `batch.cli`."""

import sys

if __name__ == "__main__":
    from batch.cli import main

    sys.exit(main())
