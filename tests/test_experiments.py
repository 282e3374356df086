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


def test_gamma_variance_tiny(capsys, tmp_path):
  code = cli_main(["--exp", "gamma_variance:tiny", "--workdir", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads((tmp_path / "gamma_variance.json").read_text())
  assert result["claim"] and result["verdict"] in out
  stats = result["gradient_statistics"]
  assert set(stats) == {"gamma=0", "gamma=1", "full"}
  # One batch's sampled gradient is noisier than the full-vocabulary one on the same rollouts.
  assert stats["gamma=0"]["gradient_variance"] > stats["full"]["gradient_variance"] > 0
  assert set(result["methods"]) == {"gamma=0", "gamma=1"}
  assert [p["title"] for p in result["panels"]][0] == "gradient variance over rollouts"
  assert (tmp_path / "gamma_variance.png").exists()
