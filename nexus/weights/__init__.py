"""Model weights on disk: safetensors checkpoints read expert by expert (`checkpoint.py`), MXFP4 decoding (`mxfp4.py`)."""
