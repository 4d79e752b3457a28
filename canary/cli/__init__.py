"""The `canary` command line: parses arguments and hands over to a supervisor or a client.

An entry point: may import any package; no package imports it.
"""
