"""Sampling rollouts from the live params: K completions per prompt record, tool tasks as multi-turn episodes.

`RolloutGenerator(cfg, sampling, batch_size=...)`.generate(params, records, k, key) -> [[Sample] * k per record].
Prompts render with `data.chat.ChatRenderer.render_for_generation` (what SFT trained on and eval prompts with);
generation stops at the renderer's end-of-turn ids (and, for the plain template, at the next 'Role:' header, as
eval does). The K samples of a prompt sit in the same sampler batch, so the sampler prefills the prompt once
(`Sampler.prefilled_rows`). Tool records run episodes in a real `rewards.tools.ToolEnv` (assistant turn ->
execute its calls -> tool results -> next turn, up to `max_turns`), all episodes of a call batched in lock-step.
Every sample's key derives from `key`, so a call is reproducible.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import jax

from kanana_jax.config import ExperimentConfig
from kanana_jax.data.chat import PLAIN_ROLES, ChatRenderer
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.generate.sampler import Sampler, SamplingParams
from kanana_jax.generate.tool_calls import from_text_messages
from kanana_jax.rewards.tools import ToolEnv, run_episode
from kanana_jax.rollout.verify import Sample


class RolloutGenerator:
    """Batched sampling of prompt records (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, sampling: SamplingParams, *, batch_size: int = 32, max_turns: int = 4,
                 mesh=None, rules=None, min_prompt_bucket: int = 16):
        self.cfg, self.batch_size, self.max_turns = cfg, batch_size, max_turns
        self.min_prompt_bucket = min_prompt_bucket   # the Sampler pads prompts to a power of two >= this
        self.mesh, self.rules = mesh, rules
        self.tokenizer = make_tokenizer(cfg.data.tokenizer)
        self.renderer = ChatRenderer.for_tokenizer(self.tokenizer)
        stops = tuple(f"\n\n{r}:" for r in PLAIN_ROLES.values()) if self.renderer.name == "plain" else ()
        self.sampling = dataclasses.replace(
            sampling, stop_token_ids=tuple(dict.fromkeys(sampling.stop_token_ids + self.renderer.stop_token_ids)),
            stop_strings=tuple(dict.fromkeys(sampling.stop_strings + stops)))
        self.generated_tokens = self.prefilled_rows = self.rows = 0

    def _complete(self, sampler: Sampler, conversations: Sequence[Sequence[dict]], key) -> list:
        """Completions of conversations, `batch_size` at a time (keys fold in the batch index)."""
        out = []
        for b, lo in enumerate(range(0, len(conversations), self.batch_size)):
            chunk = conversations[lo:lo + self.batch_size]
            prompts = [self.renderer.render_for_generation(list(c)) for c in chunk]
            got = sampler.generate(prompts, self.sampling, jax.random.fold_in(key, b))
            self.prefilled_rows += sampler.prefilled_rows
            self.rows += len(chunk)
            self.generated_tokens += sum(len(c.tokens) for c in got)
            out += got
        return out

    def generate(self, params, records: Sequence[dict], k: int, key) -> list[list[Sample]]:
        sampler = Sampler(self.cfg.model, params, tokenizer=self.tokenizer, mesh=self.mesh, rules=self.rules,
                          min_prompt_bucket=self.min_prompt_bucket)
        samples: list[list[Sample | None]] = [[None] * k for _ in records]
        single = [(i, j) for i, r in enumerate(records) if r["bucket"] != "tool" for j in range(k)]
        done = self._complete(sampler, [records[i]["messages"] for i, _ in single], jax.random.fold_in(key, 0))
        for (i, j), c in zip(single, done):
            text = (c.text or "").strip()
            samples[i][j] = Sample(text, (text,), ({"role": "assistant", "content": text},), len(c.tokens),
                                   c.finish_reason)
        episodes = [(i, j) for i, r in enumerate(records) if r["bucket"] == "tool" for j in range(k)]
        if episodes:
            for (i, j), sample in zip(episodes, self._episodes(sampler, [records[i] for i, _ in episodes],
                                                               jax.random.fold_in(key, 1))):
                samples[i][j] = sample
        return samples

    def _episodes(self, sampler: Sampler, records: Sequence[dict], key) -> list[Sample]:
        """Tool episodes, every live episode's next turn generated in one batch (episode order fixed)."""
        from kanana_jax.evals.runner import _Lockstep  # pylint: disable=import-outside-toplevel
        calls = [0]

        def generate_batch(conversations):
            calls[0] += 1
            return self._complete(sampler, conversations, jax.random.fold_in(key, calls[0]))

        lockstep = _Lockstep(generate_batch, len(records))
        results: list = [None] * len(records)
        errors: list = []

        def worker(n: int):
            tokens, last = [0], [None]
            try:
                def generate(messages):
                    last[0] = lockstep.generate(n, messages)
                    tokens[0] += len(last[0].tokens)
                    return (last[0].text or "").strip()
                rec = records[n]
                msgs, turns = run_episode(ToolEnv(rec.get("tools"), rec.get("initial_state")), rec["messages"],
                                          generate, self.max_turns)
                generated = from_text_messages(msgs[len(rec["messages"]):])
                results[n] = Sample(turns[-1] if turns else "", tuple(turns), tuple(generated), tokens[0],
                                    last[0].finish_reason if last[0] is not None else "length")
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
            finally:
                lockstep.finish()

        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(len(records))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
