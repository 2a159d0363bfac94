"""Mid-training: `train.init_from` (a workdir, a step, an HF directory; mismatches named), token-weighted mixtures
that hold their weights (also across a resume), per-source metrics, and the experiment config at every size."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import midtrain
from experiments.sweep_dsl import expand
from kanana_jax.cli import build_config
from kanana_jax.config import ConfigError, DataConfig
from kanana_jax.convert.orbax_hf import restore_params, workdir_to_hf
from kanana_jax.data import pipeline
from kanana_jax.train import init_from, loop

SETS = ["model.n_layers=2", "train.progress_bar=false", "train.tensorboard=false", "train.log_every=1",
        "train.async_checkpoint=false"]


def _run(spec, workdir, extra=()):
    _, cfg = build_config(spec, SETS + list(extra))
    loop.run(cfg, str(workdir))
    return cfg


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 4-step tiny pre-training run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("pretrain")
    _run("experiments/pretrain.py:size=tiny,steps=4,batch=4,seq_len=32", workdir,
         ["train.checkpoint_every=2", "train.eval_every=0", "train.keep_checkpoints=3"])
    return str(workdir)


def _initial_params(spec_arg, tmp_path, extra=()):
    """The step-0 params of a midtrain run started with `init_from` (a 1-step run with a step-0 hook)."""
    _, cfg = build_config(f"experiments/midtrain.py:size=tiny,steps=1,batch=4,seq_len=32,{spec_arg}",
                          SETS + list(extra))
    trainer = loop.build_trainer(cfg)
    with trainer.context():
        params, provenance = loop.initial_params(trainer, jax.random.PRNGKey(0))
    return jax.device_get(params), provenance


def test_init_from_a_workdir_takes_its_newest_params_with_provenance(source, tmp_path):
    workdir = tmp_path / "mid"
    cfg = _run(f"experiments/midtrain.py:size=tiny,steps=2,batch=4,seq_len=32,init_from={source}", workdir,
               ["train.eval_every=2", "train.eval_batches=1"])
    assert cfg.train.stage == "midtrain"
    _, want = restore_params(source, 4)
    got, provenance = _initial_params(f"init_from={source}", tmp_path)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)
    assert provenance["step"] == 4 and provenance["checksum"] == init_from.params_checksum(want)
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["provenance"]["init_from"] == f"{source}:4" and saved["train"]["init_from"] == source
    rows = _rows(workdir)
    assert rows[0]["init_from"] == f"{source}:4" and rows[0]["init_from_step"] == 4
    assert rows[0]["init_from_checksum"] == int(provenance["checksum"], 16) and "init_from" not in rows[1]
    # per-source metrics of the reasoning : replay mixture, and held-out eval per group
    for key in ("tokens/reasoning", "tokens/replay", "lm_loss/reasoning", "lm_loss/replay",
                "mixture_share/reasoning", "eval_loss/wiki_en", "eval_loss/wiki_ko", "eval_loss/reasoning"):
        assert key in rows[-1], key
    assert rows[-1]["tokens/reasoning"] + rows[-1]["tokens/replay"] == rows[-1]["tokens"]


def test_init_from_a_given_step_and_a_missing_step(source, tmp_path):
    got, provenance = _initial_params(f"init_from={source}:2", tmp_path)
    _, want = restore_params(source, 2)
    assert provenance["step"] == 2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3; steps: \[2, 4\]"):
        _initial_params(f"init_from={source}:3", tmp_path)


def test_init_from_a_different_model_names_the_key_and_the_leaf(source, tmp_path):
    with pytest.raises(ConfigError, match=r"train.init_from.*model.d_model \(this run 64, source 128\).*"
                                          r"first differing parameter: \S+: saved \(1, 128, 80\) float32, expected \(1, 64, 80\)"):
        _initial_params(f"init_from={source}", tmp_path, ["model.d_model=64"])


def test_init_from_an_hf_directory(source, tmp_path):
    hf_dir = str(tmp_path / "hf")
    workdir_to_hf(source, hf_dir)
    got, provenance = _initial_params(f"init_from=hf:{hf_dir}", tmp_path)
    _, want = restore_params(source, 4)
    assert provenance["kind"] == "hf" and provenance["checksum"] == init_from.params_checksum(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_array_equal(a, b)


def test_bad_init_from_specs_are_named():
    with pytest.raises(ConfigError, match="'hf:' needs a directory"):
        init_from.parse("hf:")
    assert init_from.parse("gs://b/run:120") == init_from.InitSource("workdir", "gs://b/run", 120)
    assert init_from.parse("gs://b/run").step is None


MIX = (("reasoning", "embedded:math_cot,code_cot", 0.8), ("replay", "embedded", 0.2))


def _shares(it):
    counts = it.stats()["packed_tokens_per_source"]
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def test_token_mixture_holds_its_weights_over_1000_batches_and_across_a_resume():
    cfg = DataConfig(mixture=MIX, mixture_weights_in="tokens", seq_len=64, global_batch_size=4)
    whole = pipeline.make_iterator(cfg, split="train", seed=3)
    first = pipeline.make_iterator(cfg, split="train", seed=3)
    for _ in range(500):
        next(whole), next(first)
    resumed = pipeline.make_iterator(cfg, split="train", seed=3)
    resumed.set_state(json.loads(json.dumps(first.get_state())))
    for _ in range(500):
        a, b = next(whole), next(resumed)
    np.testing.assert_array_equal(a["inputs_BxT"], b["inputs_BxT"])
    np.testing.assert_array_equal(a["source_ids_BxT"], b["source_ids_BxT"])
    for it in (whole, resumed):
        shares = _shares(it)
        assert abs(shares["reasoning"] - 0.8) < 0.01 and abs(shares["replay"] - 0.2) < 0.01, shares
    # the per-token source ids agree with the counts
    ids = a["source_ids_BxT"][a["segment_ids_BxT"] > 0]
    assert set(np.unique(ids)) <= {0, 1}


def test_missing_or_empty_mixture_source_is_named(tmp_path):
    cfg = DataConfig(mixture=(("ok", "embedded:math", 1.0), ("gone", str(tmp_path / "none.jsonl"), 1.0)))
    with pytest.raises(FileNotFoundError, match="data.mixture source 'gone'"):
        pipeline.make_iterator(cfg, split="train", seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = DataConfig(mixture=(("ok", "embedded:math", 1.0), ("empty", str(empty), 1.0)))
    with pytest.raises(ValueError, match="'empty'.*holds no documents"):
        pipeline.make_iterator(cfg, split="train", seed=0)


@pytest.mark.parametrize("size", ["tiny", "small", "kanana2_30b_a3b", "kanana2_155b_a17b"])
def test_midtrain_config_builds_for_every_size(size):
    _, cfg = build_config(f"experiments/midtrain.py:size={size},replay=0.05")
    assert cfg.train.stage == "midtrain" and cfg.data.mixture_weights_in == "tokens"
    assert [e[2] for e in cfg.data.mixture] == [0.95, 0.05]
    if size.startswith("kanana2"):
        assert cfg.mesh.rules == "fsdp_ep" and midtrain.topology(f"size={size}").startswith("v5p-")


def test_midtrain_sweep_expands_and_replay_is_checked():
    points = expand(midtrain.sweep(), midtrain.get_config, "size=tiny")
    assert len(points) == 8
    shares = sorted({sum(w for n, _, w in p["data.mixture"] if n == "replay") for p in points})
    assert shares == [0.0, 0.05, 0.2, 0.5]
    with pytest.raises(ConfigError, match="replay"):
        midtrain.get_config("replay=1.0")
