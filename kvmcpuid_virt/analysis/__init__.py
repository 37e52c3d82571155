"""Pure analysis across hosts and configurations: `baseline.py` (what every
host can run), `diff.py` (named differences), `given.py` (configurations users
already have, applied to a table) and `compare.py` (what a guest saw against
what was configured, per bit, with layer attribution)."""
