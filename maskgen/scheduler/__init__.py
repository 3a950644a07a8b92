"""Decoding: mask schedules, the MaskGIT loop (official and maskgen modes), guidance, ReCAP.

Nothing here imports a model: decoders take logits callables, so fake models
test them and any architecture can plug in.
"""
from maskgen.scheduler.decode import DecodeConfig, DecodeResult, decode
from maskgen.scheduler.keys import example_keys
from maskgen.scheduler.recap import RecapConfig, RecapPlan, decode_recap, recap_plan
from maskgen.scheduler.schedules import count_table, halton_order, mask_ratio, remaining_table, tokens_per_step

__all__ = [
    "DecodeConfig", "DecodeResult", "decode", "example_keys", "RecapConfig", "RecapPlan",
    "decode_recap", "recap_plan", "count_table", "halton_order", "mask_ratio",
    "remaining_table", "tokens_per_step",
]
