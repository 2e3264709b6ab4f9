"""Infrastructure every stage uses: atomic artifacts (`artifacts.py`), Ray start-up and resource checks (`cluster.py`), driver-side checks (`preflight.py`)."""
