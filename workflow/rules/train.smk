# One job per run, submitted through submitit (launcher.cluster: local or slurm): it trains the run,
# then measures its int8 perplexity (ofe.train.quantise) on the same node, so no model is ever loaded on a login
# node and a run waits in the queue once. The rule waits for the job (re-attaching to one a killed head
# left running) and fails with its traceback if it fails.
# params are the run's full config and the quant settings: a change reruns exactly the runs it touches.
# A change of `quant:` alone reruns the job, which finds the run's final checkpoint, rewrites its files
# without training and quantises again (seconds per run).
# Waiting rules share one squeue/sacct per poll through the status cache in STATUS_DIR; on SLURM they
# hand their runs to one dispatcher per workflow (job arrays, packed runs: ofe/cluster/dispatch.py).
# `exec`: the waiting process replaces the rule's shell (bash keeps ~3 MB per run in flight otherwise).
STATUS_DIR = f"{RESULTS}/.ofe-status"
QUANT_JSON = json.dumps(PLAN["quant"], sort_keys=True)


rule train:
    input:
        data=rules.prepare_data.output.meta,
    # The job writes metrics.parquet, then summary.json, then quant.parquet, each atomically: the last
    # one is the run's completion mark and its only declared output (each output costs plan time on a
    # large grid). A run whose other files go missing is reported as missing or corrupt by the
    # aggregation, and a rerun moves files of another config aside (ofe.train.checkpoint).
    output:
        quant=f"{RESULTS}/runs/{{run}}/quant.parquet",
    params:
        run=run_config_json,
        quant=QUANT_JSON,
        out=f"{RESULTS}/runs/{{run}}",
    threads: RUN_THREADS
    resources:
        ofe_jobs=1,  # a profile caps the jobs in flight with `resources: [ofe_jobs=N]`
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    shell:
        "exec python -m ofe launch --run-json {params.run:q} --launcher-json {LAUNCHER_JSON:q}"
        " --quant-json {params.quant:q} --status-dir {STATUS_DIR:q} --out {params.out:q} > {log:q} 2>&1"
