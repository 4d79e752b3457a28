"""Reports: a record becomes a report model, then Markdown, HTML (with SVG charts) or JSON.

Pure from record entries to text; ``pages`` adds the record discovery and the /reports/
routes (the `canary report` command is ``canary.cli.report``). May import: ``canary.core``
(the record schema), ``analysis`` types; never the runner or a supervisor except through
``pages``.
"""
