"""The wire: framing of newline-delimited JSON, flow control, addresses, the error codes and limits.

Importing this package imports nothing else: the error codes are the vocabulary every layer
reports in, and a module that needs only them must not pull in the framing.
"""
