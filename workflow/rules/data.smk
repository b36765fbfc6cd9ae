# Tokenise the dataset once; every run reads the shared cache.
rule prepare_data:
    output:
        meta=f"{DATA_DIR}/meta.json",
        train=f"{DATA_DIR}/train.bin",
        val=f"{DATA_DIR}/val.bin",
    params:
        data=json.dumps(PLAN["data"]["config"], sort_keys=True),
    log:
        f"{RESULTS}/logs/prepare_data.log",
    shell:
        "python -m ofe prepare --data-json {params.data:q} --out {DATA_DIR:q} > {log:q} 2>&1"
