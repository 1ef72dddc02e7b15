"""Front ends: adapters that carry bytes between a wire and the data plane (service/dataplane).

`grpc_frontend.build` makes the gRPC server: the completion-queue front end (`core.py`, its
asyncio lane `core_loop.py`, proven at startup by `selftest.py`) with the data plane's fast
lanes plugged in, or plain grpc.aio. Only service/server.py imports this package; the API
layer (servicers, data plane) never does. docs/architecture.md says how to add one.
"""
