# ofe: one job per run of the ablation grid in config.yaml, then aggregate and report.
# Thin on purpose: every rule calls `python -m ofe <subcommand>`; the logic lives in the package.
from snakemake.utils import min_version

min_version("9.20")


# config.yaml, unless config files are named on the command line (`--configfile configs/paper-int8.yaml`):
# those are then the whole config, merged in the order given, so a study set never runs mixed with the
# default grid's studies and defaults.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/inspect.smk"
include: "workflow/rules/report.smk"


# When runs fail (keep-going lets the others finish), still report what exists, so the report lists
# the failed runs with their error. The partial tables go to results/partial/, not to the aggregate
# rule's outputs, so the next invocation still reruns the failed runs, then aggregates.
onerror:
    if Path(f"{RESULTS}/plan.json").exists():
        partial, logs = f"{RESULTS}/partial", f"{RESULTS}/logs"
        shell(
            "python -m ofe aggregate --plan {RESULTS:q}/plan.json --results {RESULTS:q} "
            "--out {partial:q} > {logs:q}/aggregate-partial.log 2>&1 && "
            "python -m ofe report --results {partial:q} --out {REPORT:q} "
            "> {logs:q}/report-partial.log 2>&1 && echo ofe: partial report: {REPORT:q} || true"
        )


rule all:
    default_target: True
    input:
        rules.report.output,
