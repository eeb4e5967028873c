"""The sync agent (issue 4): store-and-forward uploads, review backends, label merge, model pull.

Not built yet; see the issue list. Nothing here is imported by the daemon."""
