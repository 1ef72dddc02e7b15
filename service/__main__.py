"""`mnist-serve` / `python -m service`: flags and MNIST_* variables -> Settings -> serve()."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from service.config import parse_args
    from service.server import serve

    serve(parse_args(argv))


if __name__ == "__main__":
    main()
