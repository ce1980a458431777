"""Bring a Hugging Face checkpoint's MoE layer into jmoe, and back.

``load_moe(path, layer)`` reads one layer's MoE block of a local checkpoint folder (config.json +
safetensors) as a :class:`jmoe.MoE`; ``save_moe`` writes it back under the family's names;
``moe_kwargs(config)`` gives a fresh layer of the family's shape (``moe_block(config)``: the
whole block, where it holds norms, projections or more around the experts: :mod:`jmoe.hf.blocks`).
Needs the ``safetensors`` package (``pip install 'jmoe[hf]'``); nothing else in jmoe imports it,
and nothing is downloaded.
"""

from jmoe.hf.convert import export_moe, load_moe, moe_block, moe_kwargs, save_moe
from jmoe.hf.families import SUPPORTED
from jmoe.hf.files import CheckpointError

__all__ = ["CheckpointError", "SUPPORTED", "export_moe", "load_moe", "moe_block", "moe_kwargs", "save_moe"]
