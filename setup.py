"""Package discovery that pyproject.toml cannot express: the top-level ``recipes/`` (the one
copy of the shipped recipes, named by the README) is installed as the package ``mexify.recipes``."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mexify", "mexify.*"]) + ["mexify.recipes"],
    package_dir={"mexify.recipes": "recipes"},
)
