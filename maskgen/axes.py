"""Logical axis names: the only place these strings are spelled.

Models annotate every parameter with these names; `maskgen.sharding` maps them
onto mesh axes with a rule table, so no model file knows about meshes.
"""

BATCH = "batch"
LENGTH = "length"  # token sequence
EMBED = "embed"  # transformer width
MLP = "mlp"  # transformer MLP hidden
HEADS = "heads"
HEAD_DIM = "kv"  # per-head feature size
VOCAB = "vocab"  # word-embedding rows (codebook + classes + mask)
POSITIONS = "positions"  # position-embedding rows
NORM = "norm"  # LayerNorm / GroupNorm scale and bias
# Convolutional tokenizer / discriminator.
CONV_H = "conv_height"
CONV_W = "conv_width"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CODEBOOK = "codebook"
CODE_DIM = "code_dim"
