"""On-policy self-distillation: the privileged prompt reaches only the teacher, the teacher
modes' formulas, a current teacher without context gives zero loss and gradient, and an
EMA teacher survives a SIGKILL exactly."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdjax import build, checkpoint, configs, evaluation, learner, recipes, trainer
from opdjax.data import PromptSource, char_tokenizer, synthetic_records
from opdjax.data import encode as encode_records
from opdjax.errors import ConfigError
from opdjax.models import Decoder, tiny_config
from opdjax.recipes.self_distill import ema_update, trust_region_logits
from opdjax.sampling import generate

REPO = Path(__file__).resolve().parent.parent


def tiny_self_distill(mode: str, **recipe):
  c = configs.float32(configs.base_config())
  c.task.train_size, c.task.eval_size = 64, 8
  c.task.completion_length, c.task.prompt_length, c.task.difficulty = 4, 6, 1
  c.recipe.name = "self_distill"
  c.recipe.teacher_mode = mode
  c.recipe.divergence = "reverse_kl"
  c.recipe.update(recipe)
  c.train.steps, c.train.batch_size = 2, 8
  c.train.log_every = c.train.save_every = 1
  c.train.tensorboard = False
  c.eval.every, c.eval.at_start = 0, False
  c.mesh.shape = (1,)
  return c


def test_the_privileged_context_is_in_the_teachers_prompt_only():
  tok = char_tokenizer()
  records = synthetic_records("addition", difficulty=1, size=4, held_out=False)
  source = PromptSource(
      records, tok, prompt_length=6, answer_length=4, privileged=("answer {answer}; {prompt}", 24)
  )
  row = source[0]
  decode = lambda ids, mask: tok.decode(ids[mask])
  student, teacher = (
      decode(row["prompt_tokens"], row["prompt_mask"]),
      decode(row["privileged_tokens"], row["privileged_mask"]),
  )
  assert student == records[0].prompt
  assert teacher == f"answer {records[0].answer}; {records[0].prompt}"
  assert "answer" not in student
  with pytest.raises(
      ConfigError,
      match=r"the privileged prompt has \d+ tokens, more than " r"recipe.privileged_length=5",
  ):
    PromptSource(
        records, tok, prompt_length=6, answer_length=4, privileged=("answer {answer}; {prompt}", 5)
    )[0]


def test_privileged_hidden_states_land_on_the_students_completion_positions():
  """Position P−1+j of the moved teacher states predicts completion token j: its logits
  equal a plain forward of [privileged prompt, completion] at position P'−1+j."""
  model = Decoder(tiny_config("qwen3", vocab_size=24), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  completion = jnp.array([[5, 6, 7], [8, 9, 0]])
  completion_mask = jnp.array([[True, True, True], [True, True, False]])
  privileged = recipes.join(
      jnp.array([[0, 1, 2, 3, 4], [0, 0, 0, 3, 2]]),
      jnp.array([[False, True, True, True, True], [False, False, False, True, True]]),
      completion,
      completion_mask,
  )
  moved = evaluation.privileged_hidden(
      graphdef, state, privileged, prompt_length=4, completion_length=3
  )
  assert moved.shape == (2, 4 + 3 - 1, model.config.hidden_size)
  tokens, mask = recipes.inputs_of(privileged)
  direct = model.hidden_states(tokens, attention_mask=mask)
  np.testing.assert_allclose(moved[:, 3:], direct[:, 4:], atol=1e-6)  # P'−1 = 4
  np.testing.assert_array_equal(moved[:, :3], 0.0)


def _completion_logprobs(model, prompt_tokens, prompt_mask, gen):
  """`log model(a_j | prompt, a_<j)` of every completion token `[B, N]`, from full logits."""
  seq = recipes.join(prompt_tokens, prompt_mask, gen.tokens, gen.mask)
  tokens, mask = recipes.inputs_of(seq)
  logits = model(tokens, attention_mask=mask)[:, -gen.tokens.shape[1] :]
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, gen.tokens[..., None], axis=-1)[..., 0]


def test_evaluation_compares_the_plain_student_with_the_privileged_teacher():
  """Both sequence KLs by hand from full logits: the student's samples on the plain prompts,
  the teacher's on the privileged ones, each scored by the student after `x` and the
  teacher after `x ⊕ c`. A teacher that read the plain prompt, or states moved by one
  slot, would give other numbers (the trainer's test below checks that a teacher equal to
  the student, with the template "{prompt}", gives KLs of 0)."""
  tok = char_tokenizer()
  records = synthetic_records("addition", difficulty=1, size=4, held_out=True)
  student = Decoder(tiny_config("qwen3", vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  teacher = Decoder(tiny_config("qwen3", vocab_size=tok.vocab_size), rngs=nnx.Rngs(1))
  key = jax.random.key(7)
  run = lambda prompts, **kw: evaluation.evaluate(
      student, prompts, tok, key=key, max_new_tokens=4, teacher=teacher, **kw
  )
  prompts = encode_records(
      records, tok, prompt_length=6, answer_length=4, privileged=("answer {answer}; {prompt}", 20)
  )
  got = run(prompts, privileged=True)

  block = jax.random.fold_in(key, 0)
  plain, privileged = (prompts.prompt_tokens, prompts.prompt_mask), (
      prompts.privileged_tokens,
      prompts.privileged_mask,
  )
  draw = lambda model, prompt, k: generate(
      model, *prompt, key=jax.random.fold_in(block, k), max_new_tokens=4
  )
  kl = lambda gen, p, q: float(jnp.mean(jnp.sum(jnp.where(gen.mask, p - q, 0.0), axis=1)))
  ys = draw(student, plain, 1)
  p, q = _completion_logprobs(student, *plain, ys), _completion_logprobs(teacher, *privileged, ys)
  np.testing.assert_allclose(got["sequence_reverse_kl"], kl(ys, p, q), rtol=1e-4, atol=1e-5)
  yt = draw(teacher, privileged, 2)
  p, q = _completion_logprobs(student, *plain, yt), _completion_logprobs(teacher, *privileged, yt)
  np.testing.assert_allclose(got["sequence_forward_kl"], kl(yt, q, p), rtol=1e-4, atol=1e-5)

  with pytest.raises(ValueError, match="privileged prompts"):
    run(encode_records(records, tok, prompt_length=6, answer_length=4), privileged=True)


def test_evaluation_in_several_blocks_shows_its_progress(capsys):
  tok = char_tokenizer()
  records = synthetic_records("addition", difficulty=1, size=4, held_out=True)
  student = Decoder(tiny_config("qwen3", vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
  prompts = encode_records(records, tok, prompt_length=6, answer_length=4)
  run = lambda batch_size: evaluation.evaluate(
      student, prompts, tok, key=jax.random.key(0), max_new_tokens=4, batch_size=batch_size
  )
  run(4)
  assert "held-out evaluation" not in capsys.readouterr().err  # one block: no bar
  run(2)
  assert "held-out evaluation:   0%|          | 0/2" in capsys.readouterr().err


def test_ema_and_trust_region_formulas():
  ema = {"w": jnp.array([1.0, 2.0])}
  params = {"w": jnp.array([3.0, -2.0])}
  np.testing.assert_allclose(ema_update(ema, params, rate=0.25)["w"], [1.5, 1.0])
  frozen, current = jnp.array([[0.3, -1.0, 2.0]]), jnp.array([[1.0, 0.5, -0.5]])
  mixed = trust_region_logits(frozen, current, alpha=0.3)
  want = 0.7 * jax.nn.log_softmax(frozen) + 0.3 * jax.nn.log_softmax(current)
  want = want - jax.scipy.special.logsumexp(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(mixed, want, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(jnp.exp(mixed)), 1.0, atol=1e-6)


def evaluated(config):
  config.eval.every, config.eval.at_start = 2, True
  config.optimizer.warmup_steps = 0  # two full updates
  return config


KLS = ("sequence_reverse_kl", "sequence_forward_kl", "token_reverse_kl", "token_forward_kl")


def test_current_teacher_without_context_gives_zero_loss_and_gradient(tmp_path):
  """... and held-out KLs of 0 at every evaluation, which read the teacher's weights of
  that moment: a frozen teacher's KLs are 0 only before the first update."""
  config = evaluated(tiny_self_distill("current", privileged="{prompt}"))
  result = trainer.run(config, tmp_path, quiet=True)
  rows = [r for r in result.history if r["split"] == "train"]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert abs(r["loss"]) < 1e-6 and r["grad_norm"] < 1e-5, r
  evals = [r for r in result.history if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [0, 2]
  for r in evals:
    for name in KLS:
      assert abs(r[name]) < 1e-5, (name, r)
  config = evaluated(tiny_self_distill("frozen", privileged="{prompt}"))
  result = trainer.run(config, tmp_path / "frozen_plain", quiet=True)
  start, end = [r for r in result.history if r["split"] == "eval"]
  assert all(abs(start[name]) < 1e-5 for name in KLS), start
  assert all(end[name] > 1e-4 for name in KLS if name.startswith("token")), end

  # With the answer in its prompt the same teacher differs from the student.
  def losses(mode):
    config = tiny_self_distill(mode)
    config.train.steps, config.optimizer.warmup_steps = 3, 1  # update 0 has lr 0, update 1 not
    result = trainer.run(config, tmp_path / mode, quiet=True)
    return [r["loss"] for r in result.history if r["split"] == "train"]

  current = losses("current")
  assert current[0] > 1e-3
  # Stale weights: a frozen teacher equals the current one until the parameters move (step 3
  # here), so a "current" teacher that kept the initial weights would match it there too.
  frozen = losses("frozen")
  np.testing.assert_allclose(frozen[:2], current[:2], rtol=1e-6)
  assert abs(frozen[2] - current[2]) > 1e-6 * abs(current[2]) + 1e-7


def _ema_and_params(workdir, config):
  abstract = nnx.state(Decoder(checkpoint.read_model_config(workdir), rngs=nnx.Rngs(0)))
  ckpt = checkpoint.Checkpointer(workdir)
  step = ckpt.latest_step()
  restored = ckpt.restore(
      step, abstract, learner.make_optimizer(config).init(abstract), {"ema": abstract}
  )
  params, extra = restored.params, restored.extra
  ckpt.close()
  flat = lambda tree: {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}
  return flat(params), flat(extra["ema"])


@pytest.mark.parametrize("mode", ["ema", "trust_region"])
def test_teacher_weights_survive_sigkill_exactly(mode, tmp_path):
  """The CLI is SIGKILLed right after its step-2 checkpoint (nothing closed or flushed) and
  the run is resumed: the same parameters as 4 uninterrupted steps, bitwise.
  - ema: the EMA weights, stored in each checkpoint, are equal too; the EMA moved from the
    initial weights but lags the student.
  - trust_region: the teacher mixes the current weights with the initial ones, which the
    resumed run rebuilds from the seed (they are not stored); rebuilding them from the
    restored parameters would change updates 3 and 4. (frozen uses the same rebuilt
    weights.)
  The drift to the teacher's weights is logged."""
  import signal
  import subprocess
  import sys

  from tests.experiments.self_distill_killed import get_config

  config = get_config(mode)
  result = trainer.run(config, tmp_path / "whole", quiet=True)
  rows = [r for r in result.history if r["split"] == "train"]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
  assert all(r["teacher_drift_kl"] >= 0 for r in rows)
  # Update 1 has rate 0 (the warm-up starts there), so the student leaves its teacher after 2.
  assert all(r["teacher_drift_kl"] > 0 for r in rows[2:])
  killed_after_step_2 = (
      "import os, signal, sys\n"
      "from opdjax import checkpoint\n"
      "save = checkpoint.Checkpointer.save\n"
      "def save_then_die(self, step, *args, **kwargs):\n"
      "  save(self, step, *args, **kwargs)\n"
      "  if step == 2:\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "checkpoint.Checkpointer.save = save_then_die\n"
      "from opdjax.train import main\n"
      "sys.exit(main(sys.argv[1:]))\n"
  )
  experiment = REPO / "tests" / "experiments" / "self_distill_killed.py"
  killed = subprocess.run(
      [sys.executable, "-c", killed_after_step_2, "--exp", f"{experiment}:{mode}"]
      + ["--workdir", str(tmp_path / "resumed")],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
  assert checkpoint.Checkpointer(tmp_path / "resumed").latest_step() == 2
  resumed = trainer.run(config, tmp_path / "resumed", quiet=True)
  assert [r["step"] for r in resumed.history if r["split"] == "train"] == [1, 2, 3, 4]
  if mode == "trust_region":
    abstract = nnx.state(
        Decoder(checkpoint.read_model_config(tmp_path / "whole"), rngs=nnx.Rngs(0))
    )
    want = checkpoint.restore_params(tmp_path / "whole", abstract)
    got = checkpoint.restore_params(tmp_path / "resumed", abstract)
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
      np.testing.assert_array_equal(b.get_value(), a.get_value(), err_msg=str(path))
    return
  params, ema = _ema_and_params(tmp_path / "whole", config)
  params_r, ema_r = _ema_and_params(tmp_path / "resumed", config)
  model = build.build_model(
      config.student,
      checkpoint.read_model_config(tmp_path / "whole"),
      seed=config.seed,
      mesh=build.build_mesh(config),
  )
  initial = {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  for name in params:
    np.testing.assert_array_equal(params_r[name], params[name], err_msg=name)
    np.testing.assert_array_equal(ema_r[name], ema[name], err_msg=name)
  moved = lambda a, b: max(np.abs(a[n] - b[n]).max() for n in a)
  assert moved(ema, initial) > 0 and moved(ema, params) > 0


def test_self_distill_config_errors():
  with pytest.raises(ConfigError, match="recipe.teacher_mode must be one of"):
    recipes.build(tiny_self_distill("stale").recipe)
  with pytest.raises(ConfigError, match="recipe.privileged must contain {prompt}"):
    recipes.build(tiny_self_distill("frozen", privileged="{answer}").recipe)
  config = tiny_self_distill("frozen")
  config.teacher.checkpoint = "/somewhere"
  with pytest.raises(ConfigError, match="is its own teacher"):
    build.setup(config)
