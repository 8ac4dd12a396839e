"""``python -m chitu_core`` (and ``torchrun -m chitu_core``) runs the CLI."""

import sys

from chitu_core.cli import main

sys.exit(main())
