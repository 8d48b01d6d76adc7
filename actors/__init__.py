"""Rollout side: workers that host the frozen target and turn batches into experiences.

Each worker is a plain class so the single-process trainer can call it directly; the Ray
pipeline wraps the same class as an actor on a GPU share.
"""
