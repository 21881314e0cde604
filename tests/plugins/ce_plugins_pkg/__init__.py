"""A plugin package, imported as a dotted module (tests put tests/plugins on sys.path)."""
