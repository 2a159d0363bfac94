"""Kernels for Muon's polar-factor iteration: out = alpha x x^T + beta c + gamma I in one pass (see ops.py)."""
