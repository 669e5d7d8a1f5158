"""Serving the deployments on one machine, and what a multi-machine set-up needs."""
