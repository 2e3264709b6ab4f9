"""Serving a specialised model with vLLM (the engine side of ``nexus export --format vllm``).

- :mod:`nexus.serving.vllm_plugin`: the ``vllm.general_plugins`` entry point (cheap to
  import, no vLLM needed until vLLM calls it) and the table of NEXUS architectures.
- :mod:`nexus.serving.vllm_models`: the NEXUS model classes vLLM builds (imports vLLM).
- :mod:`nexus.serving.vllm_run`: running vLLM in its own environment (tests, benchmarks).

Writing the directory vLLM serves is the ``export`` stage's job (:mod:`nexus.stages.export`).
"""
