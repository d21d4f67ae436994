"""Integrations with other libraries, one module each (imported on demand, never by ``effattn``).

- :mod:`effattn.integrations.transformers`: effattn as an ``attn_implementation`` of Hugging Face
  transformers models (``pip install 'effattn[transformers]'``).
"""
