"""Regression detection statistics: which way is better, per-point verdicts, change points, two-sample comparison.

Pure functions over plain sequences (lists, tuples or numpy arrays of finite floats); no I/O but the start-up
loader of the threshold override file. The server wires these into record acks, background change-point
detection, alerts and the `compare` op.
"""
