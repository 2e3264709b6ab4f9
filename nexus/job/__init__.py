"""The end-to-end specialisation job (``jobs/specialize.py``, ``nexus specialize``): the YAML
config (:mod:`.config`), the resumable stage runner (:mod:`.runner`), the job itself
(:mod:`.run`), URI outputs (:mod:`.remote`) and the report (:mod:`.report`)."""
