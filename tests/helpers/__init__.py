"""What tests share besides fixtures (those stay in tests/conftest.py): the repository's root, a tiny
run config and the hook that kills a run (`runs`), the Snakemake command of the workflow tests
(`workflow`), skipping or failing on a missing system service (`services`), tiny transformers models
(`hf_models`), reading a built report page (`report_html`), and a job that reports its environment
(`launch_probe`)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
