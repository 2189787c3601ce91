import os
import sys

# Tests import helpers (dist_harness) from this folder and the packages from the repo root.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
