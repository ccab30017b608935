"""What a result is: request schema, gRPC scenario mapping, units, ids, timestamps, sys_info scrubbing."""
