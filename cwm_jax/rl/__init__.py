"""Reinforcement learning: running the untrusted programs that rewards are computed from, isolated."""
