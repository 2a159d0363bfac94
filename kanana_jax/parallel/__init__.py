"""Parallelism beyond GSPMD's automatic partitioning: expert-parallel MoE dispatch and multi-host start-up."""
from kanana_jax.parallel.expert import ExpertPlan, current_plan, dispatch, make_plan
from kanana_jax.parallel.multihost import initialize

__all__ = ["ExpertPlan", "current_plan", "dispatch", "make_plan", "initialize"]
