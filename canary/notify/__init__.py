"""Notifications: record entries become chat messages on webhooks.

May import: ``canary.core`` (the record schema) and the shared retry helper; never the
runner or a supervisor.
"""
