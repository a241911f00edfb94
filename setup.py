"""Package discovery, which setup.cfg cannot express alone: every ``memlab`` package found
on disk, plus ``memlab_kernels`` mapped from the top-level ``kernels/`` directory.
Everything else (metadata, dependencies, package data) is in setup.cfg."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["memlab", "memlab.*"]) + ["memlab_kernels"],
      package_dir={"memlab_kernels": "kernels"})
