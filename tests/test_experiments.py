"""The claim experiments beyond compare_objectives: their `:tiny` variants end to end, and
the statistics they report checked against direct computations."""

import json
import re

import numpy as np
import pytest

from opdjax.errors import ConfigError
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


def test_gamma_variance_on_addition_differs_from_the_chain_in_its_task_only():
  """The addition variant (the default) is checked at the config level; the suite runs the
  chain variant below, through the same code (suite time)."""
  addition, chain = (gamma_variance.get_config(a) for a in ("tiny", "tiny,modular_chain"))
  for config, task in ((addition, "addition"), (chain, "modular_chain")):
    assert {s.task.name for s in config.stages.values()} == {task}
    assert config.method_template.task.name == task
    assert config.method_template.recipe.estimator == "sampled" and config.gammas == "0.5"


def test_gamma_variance_tiny_on_the_chain(capsys, tmp_path, copy_finished_stages):
  arg = "tiny,modular_chain"
  copy_finished_stages(gamma_variance.get_config(arg).stages, tmp_path)
  code = cli_main(["--exp", f"gamma_variance:{arg}", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "gamma_variance_modular_chain.json").read_text())
  assert result["claim"] and result["verdict"] in out
  # the score the verdict and the second panel use: step credit on the chain
  score = "step_credit_greedy"
  assert result["score"] == score and f"Final {score}" in result["verdict"]
  assert (
      result["methods"]["gamma=0.5"][score]["mean"]
      == result["panels"][1]["series"]["mean ± std"]["y"][0]
  )
  stats = result["gradient_statistics"]
  assert set(stats) == {"gamma=0.5", "full"}
  # One batch's sampled gradient is noisier than the full-vocabulary one on the same rollouts.
  assert stats["gamma=0.5"]["gradient_variance"] > stats["full"]["gradient_variance"] > 0
  assert set(result["methods"]) == {"gamma=0.5"}
  assert (tmp_path / "opd_gamma0p5_seed0" / "metrics.jsonl").exists()
  assert [p["title"] for p in result["panels"]][0] == "gradient variance over rollouts"
  assert (tmp_path / "gamma_variance_modular_chain.png").exists()


def test_gamma_variance_variance_only_on_the_long_horizon_task(capsys, tmp_path):
  """`:tiny,modular_chain,variance`: the chain's stages, then the gradient statistics alone
  (no training runs), reported under the task's name."""
  code = cli_main(
      ["--exp", "gamma_variance:tiny,modular_chain,variance", "--workdir", str(tmp_path)]
  )
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "gamma_variance_modular_chain_variance.json").read_text())
  assert result["task"] == "modular_chain" and result["completion_length"] == 24
  assert result["verdict"] in out and set(result["gradient_statistics"]) == {"gamma=0.5", "full"}
  assert not list(tmp_path.glob("opd_gamma*"))  # no training stage ran
  with pytest.raises(ConfigError, match="one size"):
    gamma_variance.get_config("tiny,full")


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


def run_config(workdir) -> dict:
  return json.loads((workdir / "config.json").read_text())


def test_exopd_lambda_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import exopd_lambda

  copy_finished_stages(exopd_lambda.get_config("tiny").stages, tmp_path)
  code = cli_main(["--exp", "exopd_lambda:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "exopd_lambda.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert set(result["methods"]) == {"λ=1.25"}  # one λ: suite time
  method = result["methods"]["λ=1.25"]
  assert 0 <= method["accuracy_greedy"]["mean"] <= 1 and method["max_grad_norm"]["mean"] > 0
  assert [p["title"] for p in result["panels"]][0] == "held-out greedy accuracy"
  assert (tmp_path / "exopd_lambda.png").exists()
  # The λ reached the recipe, the student started from the warm start toward the teacher.
  config = run_config(tmp_path / "lambda1p25_seed0")
  assert config["recipe"]["name"] == "gopd" and config["recipe"]["reward_scale"] == 1.25
  assert config["recipe"]["estimator"] == "full"
  assert config["student"]["init_from"].endswith("warmstart")
  assert config["teacher"]["checkpoint"].endswith("teacher")
  assert config["reference"]["checkpoint"] == ""  # the student's initial weights


def test_exopd_lambda_rejects_bad_lambdas():
  from opdjax.experiments import exopd_lambda

  config = exopd_lambda.get_config("tiny")
  for bad, message in (("1,-0.5", r"values >= 0, got \[-0.5\]"), ("a", "comma-separated")):
    config.lambdas = bad
    with pytest.raises(ConfigError, match=message):
      exopd_lambda._stages(config)


def test_exopd_reward_correction_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import exopd_reward_correction as rc

  shared = rc.get_config("tiny").stages
  copy_finished_stages({n: shared[n] for n in ("teacher_base", "warmstart")}, tmp_path)
  code = cli_main(["--exp", "exopd_reward_correction:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "exopd_reward_correction.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert set(result["methods"]) == {"exopd_student_ref", "exopd_base_ref"}
  # The teacher continues from its base; only the corrected run reads the base as reference.
  assert run_config(tmp_path / "teacher")["student"]["init_from"].endswith("teacher_base")
  corrected = run_config(tmp_path / "exopd_base_ref_seed0")
  plain = run_config(tmp_path / "exopd_student_ref_seed0")
  assert corrected["reference"]["checkpoint"].endswith("teacher_base")
  assert plain["reference"]["checkpoint"] == ""
  assert corrected["recipe"]["reward_scale"] == plain["recipe"]["reward_scale"] == 1.25
  assert (tmp_path / "exopd_reward_correction.png").exists()


def test_grpo_plus_opd_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import grpo_plus_opd

  copy_finished_stages(grpo_plus_opd.get_config("tiny").stages, tmp_path)
  code = cli_main(["--exp", "grpo_plus_opd:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "grpo_plus_opd.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert set(result["methods"]) == {"grpo", "grpo_opd"}
  # Only the GRPO+OPD arm weights the teacher's signal; both sample groups from the warm start.
  plain, mixed = (run_config(tmp_path / f"{m}_seed0") for m in ("grpo", "grpo_opd"))
  assert plain["recipe"]["opd_weight"] == 0.0 and mixed["recipe"]["opd_weight"] == 1.0
  for config in (plain, mixed):
    assert config["recipe"]["name"] == "grpo" and config["recipe"]["group_size"] == 4
    assert config["student"]["init_from"].endswith("warmstart")
  assert (tmp_path / "grpo_plus_opd.png").exists()


def test_grpo_rewards_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import grpo_rewards

  copy_finished_stages(grpo_rewards.get_config("tiny").stages, tmp_path)
  code = cli_main(["--exp", "grpo_rewards:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "grpo_rewards.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert set(result["methods"]) == {"exact", "step_credit"}
  # Each arm scores its groups with the reward it names, from the warm start, no teacher.
  for reward in ("exact", "step_credit"):
    config = run_config(tmp_path / f"{reward}_seed0")
    assert config["recipe"]["name"] == "grpo" and config["recipe"]["reward"] == reward
    assert config["recipe"]["opd_weight"] == 0.0 and config["teacher"]["checkpoint"] == ""
    assert config["student"]["init_from"].endswith("warmstart")
    assert config["task"]["name"] == "modular_chain"
    uniform = result["methods"][reward]["training"]["zero_std_groups"]["y"]
    assert uniform and all(0.0 <= u <= 1.0 for u in uniform)
  assert not (tmp_path / "teacher").exists()
  assert (tmp_path / "grpo_rewards.png").exists()


def test_grpo_rewards_verdict_needs_a_better_student_not_only_a_denser_signal():
  from opdjax.experiments.grpo_rewards import verdict

  def method(credit, std, uniform):
    stat = lambda mean: {"mean": mean, "std": std, "per_seed": [mean]}
    return {
        "accuracy_greedy": stat(0.0),
        "step_credit_greedy": stat(credit),
        "curves": {"step_credit_greedy": {"x": [0, 25], "y": [0.13, credit]}},
        "training": {"zero_std_groups": {"x": [5, 10], "y": [uniform, uniform]}},
    }

  holds = verdict({"exact": method(0.11, 0.01, 0.95), "step_credit": method(0.2, 0.01, 0.1)})
  assert "gives more groups a signal" in holds and "claim holds" in holds
  denser_only = verdict({"exact": method(0.11, 0.01, 0.95), "step_credit": method(0.09, 0.01, 0.1)})
  assert "gives more groups a signal" in denser_only and "not supported" in denser_only
  neither = verdict({"exact": method(0.11, 0.05, 0.95), "step_credit": method(0.14, 0.05, 0.9)})
  assert "does not give more groups" in neither and "not supported" in neither


def test_grpo_plus_opd_verdict_needs_grpo_opd_to_reach_grpo_sooner():
  from opdjax.experiments.grpo_plus_opd import verdict

  acc = lambda mean, std: {"accuracy_greedy": {"mean": mean, "std": std}}
  never = verdict({"grpo": acc(0.583, 0.048), "grpo_opd": acc(0.557, 0.015)}, None, 150)
  assert never == (
      "Final held-out greedy accuracy: GRPO 0.583 ± 0.048, GRPO+OPD 0.557 ± 0.015 (-0.026, "
      "within one std). GRPO+OPD never reaches GRPO's final accuracy. The claim is not "
      "supported at this scale."
  )
  sooner = verdict({"grpo": acc(0.5, 0.02), "grpo_opd": acc(0.56, 0.02)}, 75, 150)
  assert "reaches GRPO's final accuracy at update 75 of 150" in sooner
  assert "(+0.060, beyond one std)" in sooner and "The claim holds" in sooner
  at_the_end = verdict({"grpo": acc(0.5, 0.02), "grpo_opd": acc(0.5, 0.02)}, 150, 150)
  assert "is not supported" in at_the_end


def test_updates_to_reach_is_the_first_evaluation_at_the_target():
  from opdjax.experiments.grpo_plus_opd import updates_to_reach

  curve = {"x": [0, 25, 50, 75], "y": [0.2, 0.45, 0.5, 0.61]}
  assert updates_to_reach(curve, 0.5) == 50
  assert updates_to_reach(curve, 0.45) == 25
  assert updates_to_reach(curve, 0.7) is None


def test_self_distill_teachers_tiny(capsys, tmp_path):
  from opdjax.data.pipeline import load_jsonl

  code = cli_main(["--exp", "self_distill_teachers:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "self_distill_teachers.json").read_text())
  assert result["claim"] and result["verdict"] in out
  assert set(result["methods"]) == {"frozen", "ema"}
  assert result["methods"]["ema"]["final_teacher_drift_kl"]["mean"] >= 0
  assert 0 <= result["warm_start_privileged_accuracy_greedy"] <= 1
  # The warm start reads each problem plain and with its answer in the teacher's template;
  # the distillation reads the plain prompts only, and its teacher builds the template.
  mixed = load_jsonl(tmp_path / "data" / "warmstart.jsonl")
  plain = load_jsonl(tmp_path / "data" / "train.jsonl")
  assert len(mixed) == 2 * len(plain) == 64
  assert mixed[len(plain)].prompt == f"answer {plain[0].answer}; {plain[0].prompt}"
  held_out = load_jsonl(tmp_path / "data" / "held_out.jsonl")
  shown = load_jsonl(tmp_path / "data" / "held_out_privileged.jsonl")
  assert shown[0].prompt == f"answer {held_out[0].answer}; {held_out[0].prompt}"
  for mode in ("frozen", "ema"):
    config = run_config(tmp_path / f"{mode}_seed0")
    assert config["recipe"]["teacher_mode"] == mode
    assert config["recipe"]["privileged"] == "answer {answer}; {prompt}"
    assert config["task"]["train_jsonl"] == str(tmp_path / "data" / "train.jsonl")
    assert config["student"]["init_from"].endswith("warmstart")
  assert run_config(tmp_path / "warmstart")["task"]["train_jsonl"].endswith("warmstart.jsonl")


def test_experiments_reject_an_unknown_size_naming_the_valid_ones():
  import importlib

  for name in (
      "early_dip",
      "exopd_lambda",
      "exopd_reward_correction",
      "forgetting",
      "gamma_variance",
      "grpo_plus_opd",
      "grpo_rewards",
      "recovering_teacher",
      "self_distill_teachers",
  ):
    experiment = importlib.import_module(f"opdjax.experiments.{name}")
    assert experiment.get_config("tiny").seeds == 1 and experiment.get_config("full").seeds == 3
    with pytest.raises(ConfigError, match=rf"{name} takes no arg, 'full' or 'tiny', got 'big'"):
      experiment.get_config("big")


def test_early_dip_on_addition_changes_one_optimizer_setting_per_variant():
  """The addition variant's stages at the config level (the suite runs the chain's)."""
  from opdjax.experiments import early_dip

  stages, _ = early_dip._stages(early_dip.get_config("tiny"))
  adam, sgd = stages["adam_seed0"], stages["sgd_seed0"]
  assert adam.optimizer.name == "adamw" and sgd.optimizer.name == "sgd"
  assert sgd.optimizer.learning_rate == 0.05 and adam.optimizer.learning_rate == 1e-4
  assert adam.recipe == sgd.recipe and adam.recipe.estimator == "full"
  assert adam.task.name == sgd.task.name == "addition"


def test_early_dip_tiny_on_the_chain(capsys, tmp_path, copy_finished_stages):
  from opdjax.experiments import early_dip

  config = early_dip.get_config("tiny,modular_chain")
  copy_finished_stages(config.stages, tmp_path)
  code = cli_main(["--exp", "early_dip:tiny,modular_chain", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "early_dip_modular_chain.json").read_text())
  assert result["verdict"] in out and set(result["methods"]) == {"adam", "sgd_matched"}
  # Each variant changes only its own optimizer setting; the recipe is the same.
  adam, sgd = (run_config(tmp_path / f"{v}_seed0") for v in ("adam", "sgd_matched"))
  assert adam["optimizer"]["name"] == "adamw" and sgd["optimizer"]["name"] == "sgd"
  assert adam["recipe"] == sgd["recipe"]
  # compare_objectives' sampled method; SGD's clipped step has the norm of Adam's first
  # full-rate step: lr·√(parameters). student-small: 2 layers × 110,832 (attention 27,648,
  # q/k norms 48, MLP 82,944, two norms 192), the final norm 96, embedding and head 2 × 51 × 96.
  assert adam["recipe"]["estimator"] == "sampled" and adam["task"]["name"] == "modular_chain"
  assert adam["optimizer"]["learning_rate"] == 1e-3
  assert early_dip.student_parameters(config) == 231_552
  assert sgd["optimizer"]["learning_rate"] == pytest.approx(1e-3 * 231_552**0.5)
  assert "step_credit_greedy" in result["methods"]["adam"]["curves"]


def test_dip_is_the_largest_move_away_from_the_start():
  from opdjax.experiments.early_dip import dip

  curve = {"x": [0, 10, 20, 30], "y": [0.5, 0.3, 0.45, 0.1]}
  assert abs(dip(curve, rise=False) - 0.4) < 1e-12
  assert dip({"x": [0, 10, 20], "y": [2.0, 2.5, 1.0]}, rise=True) == 0.5
  assert dip({"x": [0, 10, 20], "y": [2.0, 1.5, 1.0]}, rise=True) == 0.0


def test_recovery_records_skip_the_wrong_value_and_answer_the_true_chain():
  """Every fourth problem as it is; the others with a prefix whose last value is wrong in the
  prompt and the true chain from the next value on as the answer (3 -2 = 1, *9 = 9, -0 = 9)."""
  from opdjax.data.tasks import Problem
  from opdjax.experiments.recovering_teacher import recovery_records

  class Fixed:  # the step (2), then the wrong digit's offset (5): 9 + 5 = 4 (mod 10)

    def __init__(self):
      self.draws = [2, 5]

    def integers(self, low, high):
      return self.draws.pop(0)

  chain = Problem("3:-2,*9,-0=", "1,9,9")
  records = recovery_records([chain, chain], Fixed())
  assert records == [
      {"prompt": "3:-2,*9,-0=", "answer": "1,9,9"},
      {"prompt": "3:-2,*9,-0=1,4,", "answer": "9"},
  ]


def test_recovering_teacher_tiny(capsys, tmp_path, copy_finished_stages):
  from opdjax.data import load_jsonl
  from opdjax.experiments import recovering_teacher

  config = recovering_teacher.get_config("tiny")
  copy_finished_stages({k: config.stages[k] for k in ("teacher", "warmstart")}, tmp_path)
  code = cli_main(["--exp", "recovering_teacher:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "recovering_teacher.json").read_text())
  assert result["verdict"] in out and set(result["methods"]) == {"consistent", "recovering"}
  assert set(result["teacher_after_mistakes"]) == {"consistent", "recovering"}
  # The recovering teacher is the teacher fine-tuned on the recovery data; each distillation
  # run reads its own teacher and the same warm start, recipe and rate.
  recover = run_config(tmp_path / "recovering_teacher")
  assert recover["student"]["init_from"] == str(tmp_path / "teacher")
  assert recover["task"]["train_jsonl"] == str(tmp_path / "data" / "recovery_train.jsonl")
  records = load_jsonl(tmp_path / "data" / "recovery_train.jsonl")
  assert records[1].prompt.count("=") == 1 and not records[1].prompt.endswith("=")
  consistent, recovering = (
      run_config(tmp_path / f"{v}_seed0") for v in ("consistent", "recovering")
  )
  assert consistent["teacher"]["checkpoint"] == str(tmp_path / "teacher")
  assert recovering["teacher"]["checkpoint"] == str(tmp_path / "recovering_teacher")
  for key in ("recipe", "optimizer", "student"):
    assert consistent[key] == recovering[key], key
  assert consistent["recipe"]["estimator"] == "sampled"


def test_qwen3_opd_plans_its_step_from_the_checkpoints_config_files(tmp_path, capsys):
  """The real-scale experiment takes its three paths as its argument (without them, one
  line naming the form), and `--dry_run` plans its step from the checkpoints'
  `config.json` files alone: Qwen3-1.7B's and Qwen3-8B's widths, at 2 layers each here."""
  from opdjax.experiments import qwen3_opd

  with pytest.raises(ConfigError, match=r"qwen3_opd takes STUDENT_DIR,TEACHER_DIR,TRAIN_JSONL"):
    qwen3_opd.get_config(None)
  qwen3_opd.save_shapes(tmp_path / "student", "1.7B", num_layers=2)
  qwen3_opd.save_shapes(tmp_path / "teacher", "8B", num_layers=2)
  (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "w3 w4", "answer": "w5"}) + "\n")
  paths = ",".join(str(tmp_path / name) for name in ("student", "teacher", "train.jsonl"))
  code = cli_main(["--exp", f"qwen3_opd:{paths}", "--workdir", str(tmp_path / "run"), "--dry_run"])
  out = capsys.readouterr().out
  assert code == 0, out[-2000:]
  assert f"hf_path: {tmp_path / 'teacher'}" in out
  assert "student: 2 layers, per-layer (auto), remat none" in out
  assert re.search(r"train step temporaries\s+[0-9.]+ GB", out)
  assert not (tmp_path / "run").exists()  # a dry run writes nothing
