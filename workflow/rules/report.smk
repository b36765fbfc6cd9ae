# Plan -> aggregate -> report. These are cheap and run on the head node.
report: "../report/workflow.rst"


localrules:
    plan,
    aggregate,
    report,


rule plan:
    output:
        f"{RESULTS}/plan.json",
    params:
        config=json.dumps(config),  # unsorted: study order is the report's order
        data_root=f"{RESULTS}/data",
    log:
        f"{RESULTS}/logs/plan.log",
    shell:
        "python -m ofe plan --config-json {params.config:q} --schema {SCHEMA:q} "
        "--data-root {params.data_root:q} --out {output:q} > {log:q} 2>&1"


# Each run's completion mark (the train job writes its summary and metrics before it) and each
# checkpoint's: the aggregation's input.
RUN_MARKS = expand(f"{RESULTS}/runs/{{run}}/quant.parquet", run=RUNS)
CHECKPOINT_MARKS = expand(f"{RESULTS}/checkpoints/{{ckpt}}/inspect.json", ckpt=CHECKPOINTS)


rule aggregate:
    input:
        # a plain path, not rules.plan.output: a rule reference makes Snakemake hash the 20,000-file
        # input lists below once per file (a 10,080-run grid took 59 s to plan instead of 20)
        plan=f"{RESULTS}/plan.json",
        runs=RUN_MARKS,
        checkpoints=CHECKPOINT_MARKS,
    output:
        runs=f"{RESULTS}/runs.parquet",
        metrics=f"{RESULTS}/metrics.parquet",
        quant=f"{RESULTS}/quant.parquet",
        checkpoints=f"{RESULTS}/checkpoints.parquet",
        checkpoint_metrics=f"{RESULTS}/checkpoint_metrics.parquet",
        checkpoint_quant=f"{RESULTS}/checkpoint_quant.parquet",
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "python -m ofe aggregate --plan {input.plan:q} --results {RESULTS:q} > {log:q} 2>&1"


# The marks rule all requests (the Snakefile says why): those missing while the tables exist. Without a
# table the aggregation runs anyway (rule all requests the tables), and Snakemake makes every missing
# input of a job it runs: requesting the marks too would only grow the DAG, +1.1 s on the first plan of
# a 10,080-run grid. One stat per mark: 26 ms for 10,080 (about 1 s from a cold cache, which Snakemake's
# own look at every file then finds warm).
MISSING_MARKS = (
    [mark for mark in (*RUN_MARKS, *CHECKPOINT_MARKS) if not os.path.exists(mark)]
    if all(os.path.exists(table) for table in rules.aggregate.output)
    else []
)


# The report's figures, each as <study>-<figure>.svg and .png (vl-convert), beside the page: figures/ for
# index.html, <stem>-figures/ for any other page (a directory() output is emptied before the rule runs, so
# two reports in one folder must not share it).
FIGURES = str(default_figures_dir(REPORT))


# The manifest is the rule's completion mark: a partial report written to REPORT by `onerror` (see
# Snakefile) never writes it, so the next invocation still rebuilds everything behind the report.
#
# The page and its figures are also marked for Snakemake's own report, for those who prefer its archive
# (runtime statistics, the rule graph, the config, each file with its caption from workflow/report/):
#
#     snakemake --report report.zip      # after a run; or --report report.html
#
# The figure files' names depend on the studies, hence one directory() output with patterns.
rule report:
    input:
        rules.aggregate.output,
    output:
        html=report(REPORT, caption="../report/report.rst", category="Report"),
        figures=report(
            directory(FIGURES),
            patterns=["{figure}.{format}"],
            caption="../report/figure.rst",
            category="Figures",
            subcategory="{format}",
            labels={"figure": "{figure}", "format": "{format}"},
        ),
        manifest=f"{RESULTS}/report.json",
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "python -m ofe report --results {RESULTS:q} --out {output.html:q} --figures {output.figures:q}"
        " --manifest {output.manifest:q} --expect-runs-digest {RUNS_DIGEST:q} > {log:q} 2>&1"
