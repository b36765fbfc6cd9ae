"""End-to-end tests that start processes: Snakemake, SLURM, a browser, submitit jobs, several training
processes. All `slow`: `make test-fast` leaves them out."""
