"""A whole federation on one machine: `cluster` (LocalCluster: real node and site
processes on 127.0.0.1, used by the tests and simulations) and `run` (`fedraft demo`)."""
