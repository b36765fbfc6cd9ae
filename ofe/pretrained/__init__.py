"""Pretrained models: loading Hugging Face checkpoints (`hf`), the int8 protocols on them (`quant`), and
`ofe inspect`, the training metrics and int8 perplexity of a pretrained model or a finished run
(`inspection`). transformers is imported only when a model is loaded.
"""
