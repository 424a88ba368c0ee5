"""``python -m epikv_triton.scoring --readme-table``: print the README's method table, rendered from the registry."""

from __future__ import annotations

import argparse

from .registry import readme_table

parser = argparse.ArgumentParser(prog="python -m epikv_triton.scoring", description=__doc__)
parser.add_argument("--readme-table", action="store_true", required=True, help="print the README's method table")
parser.parse_args()
print(readme_table(), end="")
