"""Run configs: `get_config(arg)` files, the one loader and the variant parser they share.

  from configs import loader
  config = loader.load_config("configs/default.py:hc,n=2")   # or "default:hc,n=2"
"""
