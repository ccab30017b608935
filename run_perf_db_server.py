#!/usr/bin/env python3
"""Run the perfdb server: ./run_perf_db_server.py --address=hostname:port --database=path"""

import sys

from perfdb.server import main

if __name__ == "__main__":
    sys.exit(main())
