"""Drop-in reproductions of other frameworks' attention code, on fastmask.

- :mod:`fastmask.compat.tf`: the TensorFlow transformer tutorial's
  ``scaled_dot_product_attention`` and its mask helpers.
"""

from . import tf

__all__ = ["tf"]
