"""`python -m ofe <subcommand>`: every workflow step runs (and is tested) without Snakemake.

  check-config  validate config.yaml, list its runs and print their memory plan
  plan          write the plan (runs, studies, config) the aggregation reads
  prepare       tokenise a dataset once into a shared cache
  train         train one run from its RUN.json (resumes from its checkpoint)
  export        mirror finished runs to Weights & Biases or MLflow from their Parquet tables
  launch        submit `train` (+ `quantise`) through submitit (local or slurm) and wait for it
  dispatch      the workflow's SLURM dispatcher (started by `launch`): arrays, packed runs, one poll
  cancel        cancel every pending or running job of this workflow
  status        where every run of the grid stands (and the head job, if `head` submitted one)
  head          run the Snakemake head itself as a long, requeued SLURM job (unattended)
  install-profile  install profiles/slurm as the global Snakemake profile `slurm`
  quantise      int8 (W8A8) perplexity of a finished run
  inspect       the training metrics and int8 perplexity of a pretrained model (or a finished run)
  aggregate     per-run files -> results/runs.parquet and results/metrics.parquet
  report        tables -> self-contained reports/index.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ofe.config import ConfigError


def _json_arg(text: str) -> dict:
    return json.loads(text)


def merge_config(base: dict, over: dict) -> dict:
    """`over` merged into `base` key by key, nested mappings too: what snakemake --configfile does."""
    out = dict(base or {})
    for key, value in (over or {}).items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_config(out[key], value) if nested else value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check-config", help="validate config.yaml, list its runs and print their memory plan")
    p.add_argument("config", type=Path, nargs="?", help="config.yaml (the default), or --config")
    p.add_argument("--config", dest="config_opt", type=Path, metavar="CONFIG", help="config.yaml")
    p.add_argument("--configfile", type=Path, action="append", default=[],
                   help="merged over the config, as snakemake --configfile does (repeatable)")
    p.add_argument("--launcher-file", type=Path,
                   help="the launcher settings a profile names (profiles/slurm/launcher.yaml for SLURM)")
    p.add_argument("--schema", type=Path, default=Path("workflow/schemas/config.schema.yaml"))

    p = sub.add_parser("plan", help="write results/plan.json from the (merged) workflow config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="config.yaml")
    src.add_argument("--config-json", type=_json_arg, help="the merged config as JSON (from Snakemake)")
    p.add_argument("--schema", type=Path, default=Path("workflow/schemas/config.schema.yaml"))
    p.add_argument("--data-root", type=Path, default=Path("results/data"))
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("prepare", help="tokenise a dataset into DIR/{train,val}.bin + meta.json")
    p.add_argument("--data-json", type=_json_arg, required=True, help="the data section (DataConfig)")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("train", help="train one run")
    p.add_argument("--config", type=Path, required=True, help="RUN.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tracking-json", type=_json_arg, help="mirror the run to W&B or MLflow (the `tracking:` "
                   "section, e.g. '{\"backend\": \"mlflow\"}'); written to OUT/tracking-settings.json")

    p = sub.add_parser("launch", help="train one run (or inspect one checkpoint) through submitit and wait for it")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-json", type=_json_arg, help="the run's full config (RunConfig)")
    what.add_argument("--checkpoint-json", type=_json_arg, help="one checkpoint of a checkpoint study (the "
                      "plan's entry): `ofe inspect` it in the job")
    p.add_argument("--launcher-json", type=_json_arg, default={"cluster": "local"},
                   help="the launcher settings; its `tracking` key: the resolved tracking settings (ofe.plan.tracking)")
    p.add_argument("--status-dir", type=Path, help="the workflow's shared SLURM status cache (RESULTS/.ofe-status)")
    p.add_argument("--quant-json", type=_json_arg, help="also quantise the run in the job (the quant section)")
    p.add_argument("--inspect-json", type=_json_arg, default={}, help="with --checkpoint-json: the inspect section")
    p.add_argument("--data-json", type=_json_arg, default={}, help="with --checkpoint-json: the data section")
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("export", help="mirror finished runs to W&B or MLflow from their Parquet tables "
                       "(a run already mirrored there is skipped; one half done is completed)")
    p.add_argument("--to", required=True, choices=["wandb", "mlflow"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", type=Path, help="config.yaml: its results_dir and tracking section")
    src.add_argument("--results", type=Path, help="a results folder (default: results)")
    p.add_argument("--project", help="W&B project / MLflow experiment (default: the config's, else ofe-<results>)")
    p.add_argument("--mode", choices=["offline", "online"], help="wandb: offline (default) or online")
    p.add_argument("--tracking-uri", help="mlflow: default the config's, else RESULTS/mlruns")

    p = sub.add_parser("dispatch", help="submit and watch the SLURM jobs of the runs handed over in STATUS_DIR "
                       "(started by `launch`; exits when idle)")
    p.add_argument("--status-dir", type=Path, required=True, help="RESULTS/.ofe-status")

    p = sub.add_parser("cancel", help="cancel every pending or running job of the run folders")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--dry-run", action="store_true", help="list the jobs, cancel nothing")

    p = sub.add_parser("status", help="where every run of the grid stands (no Snakemake needed)")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--max-age", type=float, default=60.0,
                   help="query SLURM (one batched call) when the shared status cache is older (s)")
    p.add_argument("--no-query", dest="query", action="store_false", help="never query SLURM; cached states only")

    p = sub.add_parser("head", help="submit the Snakemake head itself as a SLURM job (low resources, long "
                       "time limit, requeued on preemption or time-out): `ofe head [options] [-- snakemake args]`")
    p.add_argument("snakemake", nargs="*", metavar="SNAKEMAKE_ARG",
                   help="after --: what the head runs `snakemake` with (default: --profile slurm)")
    p.add_argument("--results", type=Path, help="the workflow's results folder, where head.json and "
                   "logs/head.log go (default: results_dir of the config the snakemake arguments name)")
    p.add_argument("--job-name", help="the head job's SLURM name (default ofe-head)")
    p.add_argument("--time", help="the head job's time limit (default 7-00:00:00); it requeues itself before it")
    p.add_argument("--cpus", type=int, help="CPUs of the head job (default 1)")
    p.add_argument("--mem-gb", type=int, help="memory of the head job in GB (default 4)")
    p.add_argument("--requeue-before-s", type=int, help="requeue this long before the time limit (default 300)")
    for key in ("partition", "account", "qos"):
        p.add_argument(f"--{key}", help=f"default: OFE_SLURM_{key.upper()}, as for the training jobs")
    p.add_argument("--dry-run", action="store_true", help="write RESULTS/head.sbatch and print it; submit nothing")

    p = sub.add_parser("install-profile", help="install profiles/slurm as a global Snakemake profile")
    p.add_argument("--name", default="slurm", help="the profile's name: `snakemake --profile NAME`")

    p = sub.add_parser("quantise", help="int8 (W8A8) perplexity of a finished run -> RUN/quant.parquet")
    p.add_argument("--run", type=Path, required=True, help="the run folder")
    p.add_argument("--quant-json", type=_json_arg, default={}, help="the quant section (QuantConfig)")

    p = sub.add_parser("inspect", help="outlier features and int8 perplexity of any pretrained causal LM "
                       "(or a finished run) -> OUT/{metrics,quant}.parquet")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a hub name (EleutherAI/pythia-160m) or a local save_pretrained folder")
    src.add_argument("--run", type=Path, help="a finished ofe run folder: its final checkpoint")
    p.add_argument("--revision", help="hub branch, tag or commit (Pythia: step1000); the step is read from it")
    p.add_argument("--step", type=int, help="the checkpoint's training step, where --revision does not carry it")
    p.add_argument("--out", type=Path, required=True)
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-config", type=_json_arg, help="a data section (DataConfig) as JSON, tokenised "
                      "with the model's own tokenizer; default: the stdlib corpus (a run: its own data)")
    data.add_argument("--text-file", type=Path, help="a UTF-8 text file to measure on")
    p.add_argument("--batches", type=int, default=4, help="held-out batches the metrics are averaged over")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, help="tokens per sequence (default: 256, or the model's positions if fewer; "
                   "a run: its own context)")
    p.add_argument("--quant-json", type=_json_arg, default={}, help="the quant section (QuantConfig)")
    p.add_argument("--max-memory-gb", type=float, help="refuse models whose fp32 weights (x2, for the "
                   "quantised copy) exceed this (default: the machine's memory)")
    p.add_argument("--cache-dir", type=Path, help="the Hugging Face hub cache (default: HF_HUB_CACHE)")
    p.add_argument("--threads", type=int, help="torch CPU threads")

    p = sub.add_parser("aggregate", help="per-run files -> runs.parquet + metrics.parquet")
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, help="where the tables go (default: --results)")

    p = sub.add_parser("report", help="tables -> self-contained HTML report, figures as SVG and PNG")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, help="the page (default reports/index.html; with --live, REPORT's "
                   "-partial sibling: reports/index-partial.html)")
    p.add_argument("--live", action="store_true", help="mid-sweep, from any shell: aggregate the runs finished so "
                   "far into RESULTS/partial/ and build the partial report (ofe/report/live.py)")
    p.add_argument("--plan", type=Path, help="with --live: the plan (default RESULTS/plan.json)")
    p.add_argument("--config", type=Path, help="with --live: the config file whose results_dir and report to use")
    p.add_argument("--figures", type=Path, help="where each figure's SVG/PNG goes (default: figures/ beside index.html, <stem>-figures/ beside any other page)")
    p.add_argument("--runs", type=Path, help="the run folders the runs table links (default: RESULTS/runs)")
    p.add_argument("--no-png", dest="png", action="store_false", help="export SVG only (PNG adds ~2 s per 20 runs)")
    p.add_argument("--manifest", type=Path, help="also write a JSON summary of what the report shows")
    p.add_argument("--expect-runs-digest", help="refuse unless RESULTS/runs.parquet holds exactly the runs "
                   "with this digest (ofe.plan.grid.runs_digest of the plan's run ids)")

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `ofe head` records how to restart it
    try:
        return _dispatch(args)
    except ConfigError as e:
        print(f"ofe: configuration error:\n{e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from ofe.io import atomic_write_json

    if args.cmd == "check-config":
        from ofe.plan import grid, memplan, studies

        config = grid.load_config(args.config_opt or args.config or Path("config.yaml"))
        for extra in args.configfile:
            config = merge_config(config, grid.load_config(extra))
        if args.launcher_file is not None:
            config = {**config, "launcher_file": str(args.launcher_file)}
        config = grid.validate(config, args.schema)
        runs = grid.expand_valid(config)
        ckpts = studies.expand(config)
        launcher = grid.launcher_settings(config, args.schema)  # and its launcher_file, if any
        grid.check_launcher(runs.values(), launcher)
        grid.check_packing(launcher)
        from ofe.plan.tracking import tracking_settings

        tracking = tracking_settings(config)
        for r in runs.values():
            print(f"{r.run_id}  ({', '.join(r.studies)})")
        for c in ckpts:
            print(f"checkpoints/{c['ckpt_id']}  ({', '.join(c['studies'])})")
        print(f"{len(runs)} runs" + (f" and {len(ckpts)} checkpoints" if ckpts else "")
              + f"; jobs go to {launcher.get('cluster', 'local')}"
              + ("" if tracking["backend"] == "none"
                 else f"; tracked in {tracking['backend']}, project {tracking['project']}"))
        rows = memplan.plan(runs.values(), launcher)
        if rows:  # checkpoint studies are checked against memory by their jobs (ofe.pretrained.hf)
            print(memplan.format_plan(rows))
        memplan.check(rows)  # a run that does not fit: ConfigError, exit 2
    elif args.cmd == "plan":
        from ofe.plan import grid, plan_from_config

        config = args.config_json if args.config_json is not None else grid.load_config(args.config)
        plan = plan_from_config(config, args.schema, args.data_root)
        atomic_write_json(args.out, plan)
        print(f"[ofe] planned {len(plan['runs'])} runs in {len(plan['studies'])} studies -> {args.out}")
    elif args.cmd == "prepare":
        from ofe.config import DataConfig
        from ofe.core.data import prepare

        out = args.out
        meta = prepare(DataConfig(**args.data_json), out)
        print(f"[ofe] tokenised {meta['tokens']} tokens ({meta['documents']} documents) "
              f"in {meta['seconds']} s -> {out}")
    elif args.cmd == "train":
        from ofe.train.trainer import load_run_config, train

        if args.tracking_json is not None:
            from ofe.plan.tracking import check_settings
            from ofe.runfolder import TRACKING_SETTINGS

            atomic_write_json(args.out / TRACKING_SETTINGS, check_settings(args.tracking_json, args.out))
        summary = train(load_run_config(args.config), args.out)
        print(f"[ofe] {args.out}: {summary['status']} at step {summary['steps_done']}")
    elif args.cmd == "launch" and args.checkpoint_json is not None:
        from ofe.cluster.launch import launch_inspect
        from ofe.plan.studies import inspect_settings

        settings = inspect_settings({"inspect": args.inspect_json})
        summary = launch_inspect(args.checkpoint_json, args.out, args.launcher_json, settings, args.data_json,
                                 args.quant_json or {}, args.status_dir, exec_wait=True)
        print(f"[ofe] {args.out}: inspected {summary['model']} at step {summary['step']}")
    elif args.cmd == "launch":
        from ofe.cluster.launch import launch
        from ofe.config import RunConfig

        launcher = dict(args.launcher_json)
        tracking = launcher.pop("tracking", None)  # the workflow's, beside the launcher's (common.smk says why)
        summary = launch(RunConfig.from_dict(args.run_json), args.out, launcher, args.status_dir,
                         args.quant_json, exec_wait=True, tracking=tracking)
        print(f"[ofe] {args.out}: {summary['status']} at step {summary['steps_done']}")
    elif args.cmd == "export":
        from ofe.track.export import main as export_main

        return export_main(args)
    elif args.cmd == "dispatch":
        from ofe.cluster.dispatch import serve

        return serve(args.status_dir)
    elif args.cmd == "cancel":
        from ofe.cluster.launch import cancel

        jobs = cancel(args.results, args.dry_run)
        verb = "would cancel" if args.dry_run else "cancelled"
        print("\n".join(f"[ofe] {verb} {j}" for j in jobs) or "[ofe] no pending or running jobs")
    elif args.cmd == "status":
        from ofe.cluster.status import format_table, no_plan_message, survey

        rows, head = survey(args.results, args.max_age, args.query)
        if head is not None:
            print(head)
        from ofe.cluster.spool import dispatcher_line

        dispatcher = dispatcher_line(args.results / ".ofe-status")
        if dispatcher is not None:
            print(dispatcher)
        if rows is None:
            print(f"ofe: {no_plan_message(args.results, head is not None)}", file=sys.stderr)
            return 0 if head is not None else 1  # a submitted head that has not planned yet is no error
        print(format_table(rows))
    elif args.cmd == "head":
        from ofe.cluster.head import main as head_main

        return head_main(args)
    elif args.cmd == "install-profile":
        from ofe.cluster.install import install_profile

        try:
            dest = install_profile(args.name)
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"ofe: {e}", file=sys.stderr)
            return 1
        print(f"[ofe] installed {dest / 'config.yaml'}; from the project root run: snakemake --profile {args.name}")
    elif args.cmd == "quantise":
        from ofe.cluster.jobs import quantise_in_process

        result = quantise_in_process(args.run, args.quant_json)
        print(f"[ofe] {args.run}: {result['rows']} quantisation rows")
    elif args.cmd == "inspect":
        return _inspect(args)
    elif args.cmd == "aggregate":
        from ofe.aggregate.runs import aggregate

        frames = aggregate(json.loads(args.plan.read_text()), args.results, args.out)
        counts = frames["runs"].status.value_counts().to_dict()
        print(f"[ofe] aggregated {len(frames['runs'])} runs {counts}, {len(frames['metrics'])} metric rows, "
              f"{len(frames['quant'])} quantisation rows, {len(frames['checkpoints'])} checkpoints "
              f"-> {args.out or args.results}")
    elif args.cmd == "report" and args.live:
        from ofe.report import live

        results, report = live.settings(args.config) if args.config else (args.results, Path("reports/index.html"))
        try:
            page, counts = live.live_report(results, args.plan, args.out, report, png=args.png)
        except live.NoPlan as e:
            print(f"ofe report --live: {e}", file=sys.stderr)
            return 2
        print(f"[ofe] partial report ({counts}): {page.resolve()}")
    elif args.cmd == "report":
        from ofe.plan.grid import default_figures_dir
        from ofe.report.page import build_report

        args.out = args.out or Path("reports/index.html")

        if args.expect_runs_digest:
            import pandas as pd

            from ofe.plan.grid import runs_digest

            ids = list(pd.read_parquet(args.results / "runs.parquet", columns=["run_id"]).run_id)
            n_runs = len(ids)
            if (args.results / "checkpoints.parquet").exists():  # the checkpoint studies' (ofe.aggregate.checkpoints)
                ckpts = pd.read_parquet(args.results / "checkpoints.parquet", columns=["ckpt_id"]).ckpt_id
                ids += [f"checkpoint:{c}" for c in ckpts]
            if runs_digest(ids) != args.expect_runs_digest:
                print(f"ofe: {args.results} holds {n_runs} runs and {len(ids) - n_runs} checkpoints, not the "
                      "grid's: the aggregated tables are out of date (Snakemake can lose track of them when a "
                      "results folder is moved or .snakemake/ is removed). Delete that folder's runs.parquet, "
                      "metrics.parquet and quant.parquet and run the workflow again.", file=sys.stderr)
                return 2
        figures = args.figures or default_figures_dir(args.out)
        path = build_report(args.results, args.out, figures_dir=figures, runs_dir=args.runs, png=args.png)
        exported = sorted(p.name for p in figures.iterdir() if p.suffix in (".svg", ".png"))
        if args.manifest:
            import pandas as pd

            runs = pd.read_parquet(args.results / "runs.parquet")
            ckpt_path = args.results / "checkpoints.parquet"
            ckpts = pd.read_parquet(ckpt_path, columns=["status"]) if ckpt_path.exists() else runs[["status"]][:0]
            atomic_write_json(args.manifest, {"report": str(path.resolve()), "runs": len(runs),
                                              "status": runs.status.value_counts().to_dict(),
                                              "checkpoints": len(ckpts),
                                              "checkpoint_status": ckpts.status.value_counts().to_dict(),
                                              "figures_dir": str(figures.resolve()), "figures": exported})
        print(f"[ofe] report: {path.resolve()} ({len(exported)} figure files in {figures})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ofe.config import DataConfig, QuantConfig, build_section
    from ofe.pretrained.hf import InspectError
    from ofe.pretrained.inspection import Settings, inspect

    for name in ("batches", "batch_size", "context", "threads", "step"):
        value, least = getattr(args, name), 0 if name == "step" else 1
        if value is not None and value < least:
            print(f"ofe inspect: --{name.replace('_', '-')} must be at least {least}, got {value}", file=sys.stderr)
            return 2
    try:
        data = build_section(DataConfig, args.data_config, "data.") if args.data_config is not None else None
        summary = inspect(args.out, model=args.model, revision=args.revision, run=args.run, data=data,
                          text_file=args.text_file,
                          settings=Settings(args.batches, args.batch_size, args.context, args.threads),
                          quant=build_section(QuantConfig, args.quant_json, "quant."),
                          max_memory_gb=args.max_memory_gb, cache_dir=args.cache_dir, step=args.step)
    except InspectError as e:
        print(f"ofe inspect: {e}", file=sys.stderr)
        return 1
    sw = summary.get("super_weight")
    found = f"layer {sw['layer']} ({sw['row']}, {sw['col']})" if sw else "none"
    print(f"[ofe] inspect {summary['model']}: step {summary['step']}, max kurtosis {summary['max_kurtosis']:.3g}, "
          f"super weight {found}, ppl {summary['ppl_fp']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
