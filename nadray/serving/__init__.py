"""Ray Serve application internals; the public entry points are in ``nadray.serve``."""
