"""Retrieval and classification metrics, evaluation runners and reports."""
