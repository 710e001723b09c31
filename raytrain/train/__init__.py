"""Distributed training on Ray Train: the loop, the sessions, the launcher."""
