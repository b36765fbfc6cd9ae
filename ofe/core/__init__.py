"""The model and what is measured on it: the GPT (`model`), the outlier metrics (`metrics`) and the
probe that collects them during training (`probe`), the optimisers (`optim`, `factored`, `muon`), the
token data (`data`), the quantisation primitives, hook sites and protocols (`quant`) and the hidden state
a forward hook sees (`hooks`). No run folders here.
"""
