"""On a task the tiny model can learn (one-digit arith), rejection sampling raises the pass rate round after round:
a short warm-start SFT on gold replies, then 3 rounds of sample 8 -> math checker -> SFT on the correct samples
(experiments/rejection_sampling_arith.py, seeded; RESULTS.md has the numbers of this configuration)."""
import json

from experiments import rejection_sampling_arith as demo

ARGS = ["--heldout", "0"]   # the defaults (RESULTS.md) without the held-out scoring: the same training path


def test_pass_rate_rises_over_three_rounds(tmp_path, compile_cache):
    rows = demo.main(["--workdir", str(tmp_path), *ARGS])
    pass1 = [r["pass@1"] for r in rows]
    assert len(rows) == 3 and pass1[0] > 0, pass1          # the warm start passes sometimes
    assert pass1[0] < pass1[1] < pass1[2] and pass1[2] > 1.5 * pass1[0], pass1
    assert rows[0]["kept"] < rows[2]["kept"] and all(r["samples"] == 236 * 8 for r in rows)
    for r in range(3):   # the SFT data of each round are exactly correct, distinct samples of the policy
        kept = [json.loads(line) for line in open(tmp_path / "rs" / f"round_{r}" / "kept_train.jsonl")]
        assert len(kept) == rows[r]["kept"] and all(k["provenance"]["reason"] == "correct" for k in kept)
        assert len({(k["provenance"]["prompt_id"], k["messages"][-1]["content"]) for k in kept}) == len(kept)
