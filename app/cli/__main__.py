"""`python -m app.cli …`: how `flywheel serve` starts its worker and web processes."""

import sys

from app.cli import main

sys.exit(main())
