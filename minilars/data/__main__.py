"""python -m minilars.data fetch|verify [--dir data] [--wheel-dir DIR]."""

from minilars.data.fetch import main_fetch

raise SystemExit(main_fetch())
