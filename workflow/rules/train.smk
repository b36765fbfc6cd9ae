# One training job per run, submitted through submitit (launcher.cluster: local or slurm); the rule
# waits for the job and fails with its traceback if it fails. params.run is the run's full config, so
# a config change reruns exactly the runs it touches.
rule train:
    input:
        data=rules.prepare_data.output.meta,
    output:
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
        metrics=f"{RESULTS}/runs/{{run}}/metrics.parquet",
    params:
        run=run_config_json,
        launcher=json.dumps(LAUNCHER, sort_keys=True),
        out=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    threads: run_threads
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    shell:
        "python -m ofe launch --run-json {params.run:q} --launcher-json {params.launcher:q}"
        " --out {params.out} > {log} 2>&1"
