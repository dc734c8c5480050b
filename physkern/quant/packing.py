"""Bit-packing of codebook indices (the storage format's index arithmetic).

The functions live in physkern.kernels.packing, beside the kernels that read the packed layout
(kernels take plain tensors and import nothing of physkern.quant); the engine imports them from
here, where the format is documented (physkern.quant.format).
"""
from physkern.kernels.packing import index_bits, pack_indices, unpack_indices, words_per_row

__all__ = ["index_bits", "pack_indices", "unpack_indices", "words_per_row"]
