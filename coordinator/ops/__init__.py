"""The operator's side: the admin client that finds a node that answers, and enrollment
bundles. The `fedraft` command groups that use them live in `coordinator.commands`."""
