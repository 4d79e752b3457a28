"""The HTTP server: probes, /metrics, /rollouts and manual commands, for any supervisor.

A supervisor implements ``RolloutSource``; routes beyond these are added as extensions.
May import: ``canary.core``, ``canary.runner``; never a supervisor.
"""
