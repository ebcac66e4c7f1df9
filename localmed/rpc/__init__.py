"""A model's layers on a clinic's other machines, through llama.cpp's RPC backend, and never in
clear: :mod:`~localmed.rpc.secret` (the clinic's one secret file), :mod:`~localmed.rpc.link`
(the TLS relay at both ends, and what a worker says of itself), :mod:`~localmed.rpc.workers`
(the ``--rpc`` list, checked before anything is sent).

llama.cpp's RPC server has no authentication and no encryption. A worker (``localmed worker``)
runs it on loopback only, behind a relay that speaks TLS 1.3 to the clinic's own machines, each
proving it holds the clinic's secret; the engine's llama.cpp talks to a relay on its own
loopback, which carries the link to the worker. ``--insecure-rpc`` speaks llama.cpp's plain
protocol on a trusted link instead.
"""

DEFAULT_PORT = 50052
"""llama.cpp's rpc-server's port, and a worker's (here: the CLI reads it at start-up, and this
module imports nothing)."""
