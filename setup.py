"""Build script. Metadata lives in pyproject.toml; this file only adds compiled extensions."""

from setuptools import setup

setup()
