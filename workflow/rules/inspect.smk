# One job per checkpoint of the checkpoint studies (`models:` instead of `grid:`): `ofe inspect` of a
# pretrained model at one revision, submitted through the same launcher as training (local or SLURM),
# re-attached the same way after a head restart, its traceback in error.txt when it fails.
# params are the checkpoint and the settings that shape its numbers: a change reruns exactly the
# checkpoints it touches. inspect.json is written last, so it is the completion mark.
rule inspect:
    output:
        f"{RESULTS}/checkpoints/{{ckpt}}/inspect.json",
    params:
        ckpt=lambda wildcards: json.dumps(CHECKPOINTS[wildcards.ckpt], sort_keys=True),
        inspect=json.dumps(PLAN["inspect"], sort_keys=True),
        data=json.dumps(PLAN["data"]["config"], sort_keys=True),
        quant=QUANT_JSON,
        out=f"{RESULTS}/checkpoints/{{ckpt}}",
    threads: PLAN["inspect"]["threads"] or 1
    resources:
        ofe_jobs=1,
    log:
        f"{RESULTS}/logs/inspect/{{ckpt}}.log",
    shell:
        "python -m ofe launch --checkpoint-json {params.ckpt:q} --inspect-json {params.inspect:q}"
        " --data-json {params.data:q} --quant-json {params.quant:q} --launcher-json {LAUNCHER_JSON:q}"
        " --status-dir {STATUS_DIR:q} --out {params.out:q} > {log:q} 2>&1"
