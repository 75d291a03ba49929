"""The package's version, in a module of its own so that modules inside the package can read
it without importing the package (which imports them)."""

VERSION = "0.1.0"
