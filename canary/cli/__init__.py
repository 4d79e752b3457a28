"""The `canary` command line: parses arguments and hands over to a supervisor or a client.

``main`` builds the parser and runs `run`, `validate`, `status` and the manual commands
against a `canary run` server; ``kubernetes``, ``clusters`` and ``report`` add their own
subcommands; ``common`` holds what they share (exit statuses, addresses, the target rule).

An entry point: may import any package; no package imports it.
"""
