"""Experiments: specs, the runner (mmengine's Runner + MLflow), sweeps (Optuna) and tracked results."""
