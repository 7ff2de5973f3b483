"""Evaluation: perplexity and run/model evaluation with provenance."""
