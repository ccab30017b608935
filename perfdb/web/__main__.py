"""`python -m perfdb.web`: the same program as the perfdb-web console script."""

import sys

from perfdb.web.app import main
from perfdb.web.supervisor import stop_with_parent

stop_with_parent()  # only when a server started it (--web-address)
sys.exit(main())
