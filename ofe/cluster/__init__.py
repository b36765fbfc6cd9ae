"""Running jobs: the callables a job runs on its node (`jobs`), kept apart from the head's side that
submits, re-attaches, waits and cancels (`launch`); the scheduler's job states (`jobstate`), where every
run stands (`status`), the Snakemake head as a SLURM job of its own (`head`), and installing the
Snakemake profile (`install`).
"""
