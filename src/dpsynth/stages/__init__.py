"""Pipeline stages: one `run(cfg, *, inputs..., out_dir, tracker) -> Result` each.

The CLI, DVC, Kubeflow components and tests all call these functions; no driver
re-implements a step (DESIGN.md "One core, three drivers").
"""
