"""Encoded images (PNG, JPEG, ...) -> MNIST-style 28x28 pixels: the one copy of that code.

Both sides import it: the client CLI (`mnist_client.images`) preprocesses files before
sending pixels, and the server (`service.dataplane.images`) decodes images clients send encoded, in
decoder processes (`mnist_imaging.pool`). One function, `decode.to_mnist`, so a PNG gives the
same pixels whichever side turns it into them.

A leaf: it imports NumPy and (lazily) Pillow, never `service` nor `mnist_client`, so a
decoder process starts without the server's imports and the client stays client-side.
Pillow is the optional `image` extra; `decode.available()` says whether it is installed.
"""
