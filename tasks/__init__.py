"""Prefect tasks by stage, each a thin wrapper over plain typed functions that tests call without Prefect."""
