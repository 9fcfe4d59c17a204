#!/usr/bin/env python
"""Download the psfhs dataset (checksum-pinned, see tskd_utils.download.SOURCES): `python data_scripts/download_psfhs.py --out RAW [--force]`."""
import sys

from tskd_utils.download import main

if __name__ == "__main__":
    sys.exit(main("psfhs"))
