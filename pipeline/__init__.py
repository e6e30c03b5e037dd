"""featcache.pipeline: the two stages and what joins them.

extraction/  files -> images -> tensors -> frozen backbone -> features (``featcache extract``)
heads/       cached features -> stacked heads -> leaderboard, metrics, plots (``featcache fit-head``)
use/         backbone + trained head as one model: predict, export, finetune
api.py       the Python API (featcache.extract, open_cache, fit_heads, load)
"""
