"""The tests, laid out like the code: unit/<subpackage>/ for ofe/<subpackage>/ (unit/ itself for the
repository as a whole: layout, rules, standalone, benchmarks), integration/ for the tests that start
processes (Snakemake, SLURM, a browser, submitit jobs, several training processes; all marked `slow`),
helpers/ for what tests import. Packages, so that two test files may share a name in two folders."""
