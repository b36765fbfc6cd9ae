"""Training one run: the Trainer and `train` (`trainer`), processes and devices (`parallel`), resumable
checkpoints (`checkpoint`, sharded ones in `dcp`), and quantising a finished run (`quantise`).
"""
