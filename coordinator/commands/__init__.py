"""The commands of `fedraft`, the operator's command line: one module per command group.

`common` holds what they share (the consoles, the connection options, the exit codes and
the helpers that map cluster errors to them); `node`, `cluster`, `sites` (`fedraft
client`), `rounds`, `models`, `certs` and `privacy` each define one Typer group, and
`demo` the `fedraft demo` command. `coordinator.cli` mounts them on the root app. They
are thin: the library they call is `coordinator.ops` (the admin client, enrollment
bundles) and `coordinator.cluster` (configuration, PKI, logging).
"""
