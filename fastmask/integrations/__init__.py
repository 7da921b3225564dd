"""Optional framework integrations; nothing here is imported by ``import fastmask``.

- :mod:`fastmask.integrations.torch_ops`: ``torch.ops.fastmask.attention``, fastmask's
  attention as a PyTorch custom operator (torch tensors in and out, ``torch.compile``
  without a graph break). Needs ``torch``.
- :mod:`fastmask.integrations.transformers`: ``register()`` makes ``"fastmask"`` an
  ``attn_implementation`` of Hugging Face ``transformers``. Needs
  ``pip install "fastmask[transformers]"``.

Importing a submodule registers nothing with the framework: the torch operator is
defined when ``torch_ops`` is imported (that is what importing it is for), and
``transformers`` sees fastmask only after an explicit ``register()``.
"""
