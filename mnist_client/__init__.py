"""Client-side code for mnist-serving: the Python client library (`mnist_client.client`), the
`mnist-client` CLI with its admin subcommands, and image preprocessing for it.

Kept apart from `service/` (the server's internals) so the tree shows the split: this package
imports only grpc, numpy, Pillow (optional) and the generated protos in `service.pb`, never the
server (tests/test_client_package.py checks it). Named `mnist_client`, not `client`, so the
installed distribution does not shadow or collide with a generic top-level `client` module.
"""
