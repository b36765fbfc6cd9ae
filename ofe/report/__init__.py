"""The self-contained HTML report from the aggregated tables: the page (`page`), its sections, tables,
int8 and checkpoint-study parts (`sections`, `tables`, `int8`, `ckpt`), HTML helpers (`htmlparts`), the
Jinja2 templates (`templates/`) and the Altair figures (`plots/`). Reads Parquet only; never imports torch.
"""
