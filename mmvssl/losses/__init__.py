"""Contrastive losses, distributed gathering and the objective built from config."""
