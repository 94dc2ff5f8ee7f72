"""Bridges to other frameworks' weights (PyTorch state_dicts)."""

from awm_jax.interop.torch_import import (SUPPORTED_MODELS, import_state_dict, read_state_dict,
                                          save_imported, torch_name)

__all__ = ["SUPPORTED_MODELS", "import_state_dict", "read_state_dict", "save_imported",
           "torch_name"]
