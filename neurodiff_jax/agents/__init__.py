"""Interpretability agents: LLM agents that diff a mystery model organism against its base, and their grades."""
