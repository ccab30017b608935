"""`python -m perfdb.web`: the same program as the perfdb-web console script."""

import sys

from perfdb.web.app import main

sys.exit(main())
