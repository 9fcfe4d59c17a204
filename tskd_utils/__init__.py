"""tskd_utils: the thin helper package behind the tskd notebooks.

One module per pipeline stage (data, teacher, diffusion, distill, evaluate), plus config and io.
"""

from pathlib import Path

__version__ = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (editable install)
