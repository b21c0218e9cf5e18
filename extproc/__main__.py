"""``python -m extproc`` runs the ``mcp-extproc`` command line."""

import sys

from extproc.commands.cli import main

sys.exit(main())
