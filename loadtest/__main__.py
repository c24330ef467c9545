"""`python -m loadtest` (what `make loadtest` runs): a Locust capacity run; see loadtest/capacity/run.py."""

import sys

from loadtest.capacity.run import main

if __name__ == "__main__":
    sys.exit(main())
