"""Planning: what a config.yaml asks for, checked and expanded, without importing torch.

YAML loading (`yamlio`), validation (`validate`), the model presets (`presets`), the grid of training
runs (`grid`), tokenizer vocabularies (`vocab`), the pretrained-checkpoint studies (`studies`), memory
estimates and the memory plan (`memory`, `memplan`), per-step costs (`costs`), and `plan_from_config`,
the plan every workflow step reads: all the Snakefile imports.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def plan_from_config(config: dict, schema: Path | None, data_root: Path | None = None) -> dict:
    """The plan: every run (id, grid labels, studies, full config), every checkpoint of the checkpoint
    studies (`ofe.plan.studies`), plus study metadata. Validates first
    (`ofe.plan.grid.validate`: numbers read, schema, paths, values, grid size), so nothing heavy is imported
    for a config that fails. `data_root` defaults to results_dir/data."""
    from dataclasses import asdict

    from ofe.config import DataConfig, QuantConfig, build_section
    from ofe.plan import grid, studies

    config = grid.validate(config, schema)
    runs = grid.expand_valid(config)
    ckpts = studies.expand(config)
    data = build_section(DataConfig, config.get("data") or {}, "data.")
    quant = build_section(QuantConfig, config.get("quant") or {}, "quant.")
    data_root = data_root if data_root is not None else Path(config.get("results_dir", "results")) / "data"
    data_dir = str(data_root / data.cache_id)
    extras = sorted({k for r in runs.values() for k in r.grid if k not in grid.AXES})
    return {
        "config": config,
        "studies": grid.studies_metadata(config),
        "grid_columns": list(grid.AXES) + extras,
        "data": {"dir": data_dir, "config": data.__dict__},
        "quant": asdict(quant),
        "inspect": studies.inspect_settings(config),
        "checkpoints": ckpts,
        "runs": [
            {"run_id": r.run_id, "grid": r.grid, "studies": r.studies,
             "config": replace(r.config, data_dir=data_dir).to_dict()}
            for r in runs.values()
        ],
    }
