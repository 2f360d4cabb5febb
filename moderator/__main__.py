"""`python -m moderator` is the `moderator` command."""

import sys

from moderator.cli.main import main

sys.exit(main())
