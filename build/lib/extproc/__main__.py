"""``python -m extproc`` runs the ``mcp-extproc`` command line."""

import sys

from extproc.cli import main

sys.exit(main())
