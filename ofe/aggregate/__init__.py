"""Run folders and checkpoint folders -> the tidy Parquet tables the report reads: training runs
(`runs`) and the checkpoint studies (`checkpoints`), both reading folders through `read`. Never imports
torch.
"""
