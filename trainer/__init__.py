"""The NumPy trainer: reads MNIST, trains an MLP from scratch, publishes versioned models."""

__version__ = "0.1.0"
