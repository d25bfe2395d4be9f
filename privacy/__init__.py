"""Transport-free privacy math and protocols shared by the coordinator and the site agent.

Modules: `shamir` (secret sharing over GF(2^521 - 1)), `prg` (AES-128-CTR mask
generator), `encoding` (fixed point in Z_2^32 with stochastic rounding), `sparsify`
(public index sets, error feedback) and `secagg` (SecAgg+ as message-driven state
objects). Nothing here imports `coordinator` or `client`, or does I/O: no network,
files or clocks, and randomness only from arguments (seeds, keys, an os.urandom-like
callable or a numpy Generator).
"""
