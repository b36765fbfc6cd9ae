# One training job per run, submitted through submitit (launcher.cluster: local or slurm); the rule
# waits for the job (re-attaching to one a killed head left running) and fails with its traceback if
# it fails. params.run is the run's full config, so a config change reruns exactly the runs it touches.
rule train:
    input:
        data=rules.prepare_data.output.meta,
    output:
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
        metrics=f"{RESULTS}/runs/{{run}}/metrics.parquet",
    params:
        run=run_config_json,
        out=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    threads: run_threads
    resources:
        ofe_jobs=1,  # a profile caps the jobs in flight with `resources: [ofe_jobs=N]`
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    shell:
        "python -m ofe launch --run-json {params.run:q} --launcher-json {LAUNCHER_JSON:q}"
        " --out {params.out:q} > {log:q} 2>&1"
