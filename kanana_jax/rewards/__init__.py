"""Verifiable rewards: math answers, sandboxed code, IFEval-style constraints, tool-use environment."""

from kanana_jax.rewards.code_sandbox import (REASONS, SandboxLimits, SandboxResult, code_reward, extract_code,
                                             network_namespace_available, run_many, run_python)
from kanana_jax.rewards.expr import ExprError, evaluate
from kanana_jax.rewards.ifeval import (REGISTRY, Constraint, InstructionResult, evaluate_instructions,
                                       ifeval_reward, make_constraint)
from kanana_jax.rewards.math import answers_match, extract_answer, math_reward, normalize_answer
from kanana_jax.rewards.tools import (TOOLS, TaskCheck, Tool, ToolEnv, Trajectory, check_task,
                                      execute_trajectory, replay_and_check, run_episode)

__all__ = [
    "REASONS", "SandboxLimits", "SandboxResult", "code_reward", "extract_code", "network_namespace_available",
    "run_many", "run_python", "ExprError", "evaluate", "REGISTRY", "Constraint", "InstructionResult",
    "evaluate_instructions", "ifeval_reward", "make_constraint", "answers_match", "extract_answer", "math_reward",
    "normalize_answer", "TOOLS", "TaskCheck", "Tool", "ToolEnv", "Trajectory", "check_task", "execute_trajectory",
    "replay_and_check", "run_episode",
]
