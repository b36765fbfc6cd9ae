# One job per checkpoint of the checkpoint studies (`models:` instead of `grid:`): `ofe inspect` of a
# pretrained model at one revision, submitted through the same launcher as training (local or SLURM),
# re-attached the same way after a head restart, its traceback in error.txt when it fails.
# params are the checkpoint and the settings that shape its numbers (ofe.plan.studies.MEASURE, the data
# without the tokenizer, which is the model's own, and quant): a change reruns exactly the checkpoints it
# touches. The studies listing a checkpoint, threads and resources are passed in the shell line instead,
# so raising inspect.mem_gb after a refusal reruns only what failed. inspect.json is written last: the
# completion mark.
INSPECT_MEASURE = json.dumps(measure_settings(PLAN["inspect"]), sort_keys=True)
INSPECT_ALL = json.dumps(PLAN["inspect"], sort_keys=True)
INSPECT_DATA = json.dumps({k: v for k, v in PLAN["data"]["config"].items() if k != "tokenizer"}, sort_keys=True)


rule inspect:
    output:
        f"{RESULTS}/checkpoints/{{ckpt}}/inspect.json",
    params:
        ckpt=lambda wildcards: json.dumps(job_spec(CHECKPOINTS[wildcards.ckpt]), sort_keys=True),
        measure=INSPECT_MEASURE,
        data=INSPECT_DATA,
        quant=QUANT_JSON,
        out=f"{RESULTS}/checkpoints/{{ckpt}}",
    threads: PLAN["inspect"]["threads"] or 1
    resources:
        ofe_jobs=1,
    log:
        f"{RESULTS}/logs/inspect/{{ckpt}}.log",
    shell:
        "exec python -m ofe launch --checkpoint-json {params.ckpt:q} --inspect-json {INSPECT_ALL:q}"
        " --data-json {params.data:q} --quant-json {params.quant:q} --launcher-json {LAUNCHER_JSON:q}"
        " --status-dir {STATUS_DIR:q} --out {params.out:q} > {log:q} 2>&1"
