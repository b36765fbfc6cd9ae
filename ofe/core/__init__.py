"""The model and what is measured on it: the GPT (`model`), the outlier metrics (`metrics`) and the
probe that collects them during training (`probe`), the optimisers (`optim`, `factored`, `muon`), the
token data (`data`) and the quantisation primitives and protocols (`quant`). No run folders here.
"""
