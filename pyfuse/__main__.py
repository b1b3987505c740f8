"""`python -m pyfuse bench|info`."""

import sys

from pyfuse.cli import main

sys.exit(main())
