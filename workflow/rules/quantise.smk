# After each run: int8 (W8A8) perplexity against full precision under every configured protocol.
# Cheap at CPU scales, so it runs where Snakemake runs (a head node on a cluster).
rule quantise:
    input:
        summary=f"{RESULTS}/runs/{{run}}/summary.json",
    output:
        f"{RESULTS}/runs/{{run}}/quant.parquet",
    params:
        quant=json.dumps(PLAN["quant"], sort_keys=True),
        run=lambda wildcards: f"{RESULTS}/runs/{wildcards.run}",
    threads: run_threads
    log:
        f"{RESULTS}/logs/quantise/{{run}}.log",
    shell:
        "python -m ofe quantise --run {params.run:q} --quant-json {params.quant:q} > {log:q} 2>&1"
