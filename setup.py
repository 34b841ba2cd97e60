"""Only what pyproject.toml cannot say: install the top-level recipes/ folder as the package data folder
ttcompress/recipes/ (everything else is in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ttcompress*"]) + ["ttcompress.recipes"],
    package_dir={"ttcompress.recipes": "recipes"},
)
