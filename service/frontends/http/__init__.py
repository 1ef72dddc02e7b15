"""The KServe v2 REST front end: sockets and HTTP framing (server.py), routes and the status
table (routes.py), JSON and binary tensors (codec.py), and the adapter onto the data plane
(api.py)."""
