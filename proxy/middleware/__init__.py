"""The built-in middlewares; importing this package registers them."""
