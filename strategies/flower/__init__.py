"""The thin Flower layer over the merge rules: the strategy that drives any rule, the reply and node-loss
policy, zero-copy reading of replies, per-round client sampling and replies merged as they arrive.

The modules directly under strategies/ are pure math and import nothing from here nor from Flower.
"""
