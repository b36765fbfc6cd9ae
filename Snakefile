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
# the failed runs with their error, through `ofe report --live` (also `make report`, mid-sweep): the
# partial tables go to results/partial/, not to the aggregate rule's outputs, so the next invocation
# still reruns the failed runs, then aggregates.
onerror:
    if Path(f"{RESULTS}/plan.json").exists():
        logs = f"{RESULTS}/logs"
        shell(  # the same command as `make report` (ofe/report/live.py), to REPORT itself
            "python -m ofe report --live --results {RESULTS:q} --out {REPORT:q} "
            "> {logs:q}/report-partial.log 2>&1 && echo ofe: partial report: {REPORT:q} || true"
        )


# The report, the aggregation's tables, and the completion marks missing while the tables exist
# (workflow/rules/report.smk). Snakemake makes a missing file only when a target (rule all's input) or a
# job that runs anyway needs it: a run folder deleted after a finished workflow, were its mark only the
# aggregation's input, would not be trained again ("Nothing to be done", as the tables and the report
# are up to date: snakemake/snakemake#1978, by design for temp() files), and the report would keep its
# numbers. Requested here, the mark reruns its job, then the aggregation and the report; so does a
# deleted table. Rule all only asks whether its input exists (it runs and records nothing), so
# requesting every mark would behave the same, at +1.2 s per plan of a 10,080-run grid. Nothing
# recorded: once the marks exist again, nothing reruns; and a dry run only reads.
rule all:
    default_target: True
    input:
        rules.report.output,
        rules.aggregate.output,
        MISSING_MARKS,
