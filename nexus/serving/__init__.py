"""Serving a specialised model: the ``nexus export`` formats and the vLLM plugin.

- :mod:`nexus.serving.export`: ``nexus export --format vllm`` (a directory ``vllm serve``
  runs: base weights linked, adapter beside them) and the dispatch to the native merge.
- :mod:`nexus.serving.vllm_plugin`: the ``vllm.general_plugins`` entry point (cheap to
  import, no vLLM needed until vLLM calls it).
- :mod:`nexus.serving.vllm_models`: the NEXUS model classes vLLM builds (imports vLLM).
"""
