"""The speed benchmark (same as ``vtr-bench`` / ``python -m vtr.bench``); see ``vtr/bench/speed.py``."""
from vtr.bench.speed import main

if __name__ == "__main__":
    main()
