# ofe: one job per run of the ablation grid in config.yaml, then aggregate and report.
# Thin on purpose: every rule calls `python -m ofe <subcommand>`; the logic lives in the package.
from snakemake.utils import min_version

min_version("9.20")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/quantise.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT,
