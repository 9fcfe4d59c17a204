#!/usr/bin/env python
"""Convert the hc18 dataset into the common format: see `python data_scripts/prepare_hc18.py --help` and the README."""
import sys

from tskd_utils.datasets import main

if __name__ == "__main__":
    sys.exit(main("hc18"))
