"""What setup.cfg cannot express alone: its ``packages = find:`` (every ``memlab`` package on
disk) plus ``memlab_kernels``, mapped from the top-level ``kernels/`` directory.  Everything
else (metadata, dependencies, package data) is in setup.cfg."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["memlab", "memlab.*"]) + ["memlab_kernels"],
      package_dir={"memlab_kernels": "kernels"})
