"""Reading corpora (`corpus.py`), Arrow list columns (`arrow.py`) and packing tokens into fixed-length blocks (`packing.py`)."""
