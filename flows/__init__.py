"""One module per Prefect flow. Flows compose tasks; nothing else."""
