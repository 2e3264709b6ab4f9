"""Demo fixtures (built-in corpus and demo base model); filled in by the demo work."""
