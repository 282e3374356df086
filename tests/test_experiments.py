"""The claim experiments beyond compare_objectives: their `:tiny` variants end to end, and
the statistics they report checked against direct computations."""

import json

import numpy as np

from opdjax.experiments import gamma_variance
from opdjax.train import main as cli_main


def test_moment_statistics_equal_the_direct_computation():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(7, 5)) + np.array([1.0, 0, 0, 2.0, 0])
  reference = np.array([1.0, 0.5, 0, 2.0, 0])
  stats = gamma_variance.moment_statistics(g.sum(0), float(np.sum(g * g)), len(g), reference)
  mean = g.mean(0)
  np.testing.assert_allclose(stats["gradient_variance"], np.var(g, axis=0, ddof=1).sum())
  np.testing.assert_allclose(stats["mean_gradient_sq_norm"], mean @ mean)
  np.testing.assert_allclose(
      stats["cosine_to_full_reverse_kl"],
      mean @ reference / np.linalg.norm(mean) / np.linalg.norm(reference),
  )
  np.testing.assert_allclose(stats["signal_to_noise"], (mean @ mean) / stats["gradient_variance"])


def test_gamma_variance_tiny(capsys, tmp_path, copy_finished_stages):
  copy_finished_stages(gamma_variance.get_config("tiny").stages, tmp_path)
  code = cli_main(["--exp", "gamma_variance:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "gamma_variance.json").read_text())
  assert result["claim"] and result["verdict"] in out
  stats = result["gradient_statistics"]
  assert set(stats) == {"gamma=0.5", "full"}
  # One batch's sampled gradient is noisier than the full-vocabulary one on the same rollouts.
  assert stats["gamma=0.5"]["gradient_variance"] > stats["full"]["gradient_variance"] > 0
  assert set(result["methods"]) == {"gamma=0.5"}
  assert (tmp_path / "opd_gamma0p5_seed0" / "metrics.jsonl").exists()
  assert [p["title"] for p in result["panels"]][0] == "gradient variance over rollouts"
  assert (tmp_path / "gamma_variance.png").exists()


def test_corrupted_prefix_continues_from_the_wrong_value():
  from opdjax.data import tasks
  from opdjax.experiments.compare_objectives import corrupt

  problem = tasks.Problem(prompt="3:+4,*2,-7=", answer="7,4,7")
  for seed in range(5):
    prefix, continued, true = corrupt(problem, 1, np.random.default_rng(seed))
    wrong = int(prefix.rstrip(","))
    assert wrong != 7 and prefix.endswith(",")
    assert continued == wrong * 2 % 10 and true == 4
    prefix, continued, true = corrupt(problem, 2, np.random.default_rng(seed))
    first, wrong = map(int, prefix.rstrip(",").split(","))
    assert first == 7 and wrong != 4 and continued == (wrong - 7) % 10 and true == 7


def test_step_costs_count_sampling_and_scoring_by_recipe():
  from opdjax.experiments import compare_objectives as co

  config = co.get_config("tiny")
  config.methods = ",".join(co.METHODS)
  stages, _ = co._stages(config)
  n_s, n_t = 10, 100
  tokens = 8 * (40 + 24)  # tiny batch × (prompt + completion) of the long-horizon task
  costs = {
      m: co.step_costs(stages[f"{m}_seed0"], student_params=n_s, teacher_params=n_t)
      for m in co.METHODS
  }
  forward_s, forward_t = 2 * n_s * tokens, 2 * n_t * tokens
  assert costs["sft"] == dict(update=3 * forward_s, sampling=0, scoring=0, total=3 * forward_s)
  assert costs["seqkd"]["sampling"] == forward_t and costs["seqkd"]["scoring"] == 0
  assert costs["supervised_kd"]["sampling"] == 0 and costs["supervised_kd"]["scoring"] == forward_t
  for opd in ("opd_reverse_kl", "opd_sampled_g0", "opd_top8"):
    assert costs[opd] == dict(
        update=3 * forward_s, sampling=forward_s, scoring=forward_t, total=4 * forward_s + forward_t
    )
  assert costs["gkd_jsd"]["sampling"] == 0.5 * forward_s  # lambda_on = 0.5 of a student pass


def test_forgetting_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import forgetting

  copy_finished_stages(forgetting.get_config("tiny").stages, tmp_path)
  code = cli_main(
      ["--exp", "forgetting:tiny", "--workdir", str(tmp_path), "--exp.methods=opd_reverse_kl"]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "forgetting.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert (result["old_task"], result["new_task"]) == ("addition", "modular_chain")
  assert set(result["methods"]) == {"opd_reverse_kl"}  # one method: suite time
  for method in result["methods"].values():  # forgotten = before − after, per seed
    after = method["addition_accuracy_greedy"]["per_seed"]
    lost = method["addition_forgotten"]["per_seed"]
    np.testing.assert_allclose(np.add(after, lost), result["old_accuracy_before"])
  # The methods trained on the new task, from the old-task student, toward the new teacher.
  config = json.loads((tmp_path / "opd_reverse_kl_seed0" / "config.json").read_text())
  assert config["task"]["name"] == "modular_chain"
  assert config["student"]["init_from"].endswith("student_old")
  assert config["teacher"]["checkpoint"].endswith("teacher_new")


def test_comparison_stages_are_shared_first_then_each_variant_and_seed():
  import ml_collections
  import pytest

  from opdjax.errors import ConfigError
  from opdjax.stages import choose, seeded_variants

  template = ml_collections.ConfigDict({"seed": 0, "recipe": {"name": "opd", "gamma": 0.0}})
  shared = {"teacher": ml_collections.ConfigDict({"seed": 0, "recipe": {"name": "sft"}})}
  variants = choose("g1,g0", {"g0": {"gamma": 0.0}, "g1": {"gamma": 1.0}}, setting="methods")
  stages, order = seeded_variants(shared, template, variants, seeds=2)
  assert order == ["teacher", "g1_seed0", "g1_seed1", "g0_seed0", "g0_seed1"]
  assert stages.g1_seed1.seed == 1 and stages.g1_seed1.recipe.gamma == 1.0
  assert stages.g0_seed0.recipe.gamma == 0.0 and template.recipe.gamma == 0.0  # copies
  with pytest.raises(ConfigError, match=r"methods='g0,x': unknown \['x'\]; valid: \['g0', 'g1'\]"):
    choose("g0,x", variants, setting="methods")
