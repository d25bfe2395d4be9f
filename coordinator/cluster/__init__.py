"""Cluster services of one node: Raft wiring, membership, blobs, RPC plumbing and config.

`replica` wraps pysyncobj around the pure core; `membership` knows the live members and
changes them; `blobs` stores content-addressed models and moves them between nodes; `rpc`
and `throttle` are the gRPC server side (roles, size caps, rate limits); `pki` the
federation CA; `metrics` and `logs` what operators watch; `config` node.toml. These are
services passed to the round driver and the API handlers, never reached through a node.
"""
