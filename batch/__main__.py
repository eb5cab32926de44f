"""`python -m batch`: the batch scoring CLI."""

import sys

from batch.cli import main

# Spawned decoding workers import the main module under another name: only the real run starts a job.
if __name__ == "__main__":
    sys.exit(main())
