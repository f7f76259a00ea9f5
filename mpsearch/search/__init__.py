"""The search: Optuna studies driven from one process, plans scored by Ray actors."""
