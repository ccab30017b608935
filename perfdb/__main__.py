"""python -m perfdb: run the perfdb server."""

import sys

from perfdb.server import main

sys.exit(main())
