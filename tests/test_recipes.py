"""The CleanRL recipes of the documentation, tested as a user applies them: each block is read from
docs/recipes.md, spliced into tests/cleanrl_shaped.py (a script with CleanRL's names, structure and
replaced lines) in place of the lines it says it replaces, and the swapped script is run against the
unswapped one. An edit of the page that breaks a recipe fails here, and so does a README whose
CleanRL example is not one of these tested blocks."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest

pytest.importorskip("torch")  # a numpy-only install skips these tests

import torch  # noqa: E402

pytest.importorskip("gymnasium")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "tests" / "cleanrl_shaped.py").read_text()
RECIPES = ROOT / "docs" / "recipes.md"


def recipes() -> dict:
    """{(name, "old" | "new"): code} from docs/recipes.md's ``<!-- recipe NAME old|new -->`` blocks."""
    text = RECIPES.read_text()
    found = {}
    for name, which, code in re.findall(r"<!-- recipe (\S+) (old|new) -->\n```python\n(.*?)```", text, re.S):
        found[name, which] = code
    return found


def splice(source: str, old: str, new: str) -> str:
    """Replaces, in ``source``, the lines the ``old`` block names: its lines verbatim, where a
    ``# ...`` line stands for everything between the lines around it (as the page says "from X
    down to and including Y")."""
    lines = source.split("\n")
    old_lines = old.rstrip("\n").split("\n")
    gap = [i for i, line in enumerate(old_lines) if line.strip().startswith("# ...")]
    head, tail = (old_lines, []) if not gap else (old_lines[:gap[0]], old_lines[gap[0] + 1:])

    def find(block, start):
        for i in range(start, len(lines) - len(block) + 1):
            if lines[i:i + len(block)] == block:
                return i
        raise AssertionError(f"the recipe's lines are not in the script:\n" + "\n".join(block))

    begin = find(head, 0)
    end = find(tail, begin + len(head)) + len(tail) if tail else begin + len(head)
    assert source.count("\n".join(head)) == 1, "the recipe's lines match more than one place"
    return "\n".join(lines[:begin] + new.rstrip("\n").split("\n") + lines[end:])


def run(source: str, **settings) -> dict:
    namespace = {"__name__": "__main__", "SETTINGS": settings}
    exec(compile(source, "cleanrl_shaped.py", "exec"), namespace)
    return namespace["RESULTS"]


def assert_same_run(got: dict, want: dict, bitwise_gae: bool, bitwise_actions: bool = True, gae_rtol: float = 1e-5):
    for a, b in zip(got["actions"], want["actions"]):
        if bitwise_actions:
            assert torch.equal(a, b), "the swapped script took other actions"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg="the swapped script took other actions")
    for key in ("advantages", "returns"):
        for a, b in zip(got[key], want[key]):
            if bitwise_gae:
                assert torch.equal(a, b), key
            else:
                torch.testing.assert_close(a, b, rtol=gae_rtol, atol=1e-5)
    for key in ("pg_loss", "v_loss", "entropy_loss", "approx_kl", "old_approx_kl", "clipfrac"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for name, value in want["parameters"].items():
        torch.testing.assert_close(got["parameters"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_every_recipe_block_is_present():
    found = recipes()
    for name in ("categorical-sample", "normal-head", "loss", "gae", "fused-optimizer", "fused-act", "fused-update"):
        assert (name, "old") in found and (name, "new") in found, name
    for name in ("categorical-head", "fused-import", "fused-act-continuous"):
        assert (name, "new") in found, name


def test_readme_cleanrl_example_is_the_tested_gae_recipe():
    """The README shows recipe 3 as its CleanRL example; it must be the block tested here, verbatim."""
    readme = (ROOT / "README.md").read_text()
    assert "```python\n" + recipes()["gae", "new"] + "```" in readme


@pytest.mark.parametrize("shared_trunk", [False, True], ids=["ppo.py", "ppo_atari_envpool.py layout"])
def test_head_loss_and_gae_recipes_keep_cleanrl_results(shared_trunk):
    r = recipes()
    critic = "self.critic(hidden)" if shared_trunk else "self.critic(x)"
    head_new = r["categorical-head", "new"].replace("self.critic(x)", critic)
    head_old = r["categorical-sample", "old"].replace("self.critic(x)", critic)
    swapped = SCRIPT
    if shared_trunk:  # the TrunkAgent's get_action_and_value is the one the run uses
        agent_at = swapped.index("class TrunkAgent")
        swapped = swapped[:agent_at] + splice(swapped[agent_at:], head_old, head_new)
    else:
        end = SCRIPT.index("class TrunkAgent")
        swapped = splice(swapped[:end], head_old, head_new) + swapped[end:]
    swapped = splice(swapped, r["loss", "old"], r["loss", "new"])
    swapped = splice(swapped, r["gae", "old"], r["gae", "new"])
    assert swapped != SCRIPT
    settings = dict(num_iterations=2, shared_trunk=shared_trunk)
    assert_same_run(run(swapped, **settings), run(SCRIPT, **settings), bitwise_gae=True)


def test_continuous_recipes_keep_cleanrl_results():
    r = recipes()
    swapped = splice(SCRIPT, r["normal-head", "old"], r["normal-head", "new"])
    swapped = splice(swapped, r["loss", "old"], r["loss", "new"])
    swapped = splice(swapped, r["gae", "old"], r["gae", "new"])
    settings = dict(env_id="Pendulum-v1", num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=2,
                    num_iterations=1, ent_coef=0.0, learning_rate=3e-4)
    # T = 2048 in float32: GAE equal to rounding, actions (same draws) bit for bit
    assert_same_run(run(swapped, **settings), run(SCRIPT, **settings), bitwise_gae=False)


def test_sampling_recipe_runs_and_learns_the_same_way():
    """Gumbel-max draws differ from Categorical.sample's, so the runs differ from the first step;
    the swapped script must run, sample valid actions and log finite losses of the same size."""
    r = recipes()
    end = SCRIPT.index("class TrunkAgent")
    swapped = splice(SCRIPT[:end], r["categorical-sample", "old"], r["categorical-sample", "new"]) + SCRIPT[end:]
    swapped = splice(swapped, r["loss", "old"], r["loss", "new"])
    swapped = splice(swapped, r["gae", "old"], r["gae", "new"])
    got, want = run(swapped, num_iterations=2), run(SCRIPT, num_iterations=2)
    assert not torch.equal(got["actions"][0], want["actions"][0])
    assert set(got["actions"][0].unique().tolist()) <= {0.0, 1.0}
    for key in ("pg_loss", "v_loss", "entropy_loss", "approx_kl"):
        assert all(abs(x) < 1e3 for x in got[key]), key
    # Both start from the same uniform policy over two actions: the same entropy in the first update
    assert got["entropy_loss"][0] == pytest.approx(want["entropy_loss"][0], rel=0.05)


# ------------------------------------------------------------------ swap 4: the fused actor-critic


def fused_script(continuous: bool, act: bool = True) -> str:
    """The script with swap 4 as docs/recipes.md gives it (the import added beside ``import fastppo``,
    the fused step built after the optimizer, the rollout's ``fused.act`` when ``act``, the fused
    minibatch loop) and swap 3's GAE."""
    r = recipes()
    assert SCRIPT.count("import fastppo\n") == 1
    swapped = SCRIPT.replace("import fastppo\n", "import fastppo\n" + r["fused-import", "new"])
    swapped = splice(swapped, r["fused-optimizer", "old"], r["fused-optimizer", "new"])
    if act:
        swapped = splice(swapped, r["fused-act", "old"], r["fused-act-continuous" if continuous else "fused-act", "new"])
    swapped = splice(swapped, r["fused-update", "old"], r["fused-update", "new"])
    return splice(swapped, r["gae", "old"], r["gae", "new"])


def test_fused_update_recipe_keeps_cleanrl_results():
    """ppo.py with CleanRL's rollout kept and the fused minibatch loop: set_batch takes CleanRL's
    float32 b_actions, update its numpy mb_inds and the annealed rate from `optimizer`; the same
    actions, and the losses, logged rates and parameters of CleanRL's step to float32 rounding."""
    settings = dict(num_iterations=2)
    got, want = run(fused_script(continuous=False, act=False), **settings), run(SCRIPT, **settings)
    assert got["learning_rate"] == want["learning_rate"] == [2.5e-4, 1.25e-4]
    # Iteration 2 acts with the fused step's parameters: GAE equal to rounding, actions bit for bit
    assert_same_run(got, want, bitwise_gae=False)


def test_fused_continuous_recipe_keeps_cleanrl_results():
    """ppo_continuous_action.py with the whole swap: the rollout's standard normal noise is the draws
    of probs.sample(), so the run is CleanRL's to float32 rounding, actions included."""
    settings = dict(env_id="Pendulum-v1", num_envs=1, num_steps=2048, num_minibatches=32, update_epochs=2,
                    num_iterations=1, ent_coef=0.0, learning_rate=3e-4)
    got, want = run(fused_script(continuous=True), **settings), run(SCRIPT, **settings)
    # The rollout's values come from the fused forward pass (another float32 rounding than torch's),
    # and 2048 float32 GAE steps carry that to ~2e-5 of the advantages
    assert_same_run(got, want, bitwise_gae=False, bitwise_actions=False, gae_rtol=1e-4)


def test_fused_discrete_recipe_runs_and_learns():
    """ppo.py with the whole swap samples with Gumbel-max, so it is another run of the same
    algorithm: valid actions, CleanRL's logged values (numpy scalars that have .item()), the first
    update at the uniform policy's entropy, and CartPole's episodes growing longer within 10k steps
    (twice as long on every seed tried, CleanRL's own script included; asserted: 1.5x)."""
    got = run(fused_script(continuous=False), num_iterations=20)
    actions = torch.stack(got["actions"])
    assert set(actions.unique().tolist()) == {0.0, 1.0}
    for key in ("pg_loss", "v_loss", "entropy_loss", "approx_kl", "old_approx_kl", "clipfrac"):
        assert all(math.isfinite(x) and abs(x) < 1e3 for x in got[key]), key
    assert got["entropy_loss"][0] == pytest.approx(math.log(2), rel=0.01)
    assert got["learning_rate"] == pytest.approx([2.5e-4 * (1 - i / 20) for i in range(20)])
    episode_length = [d[1:].numel() / max(1.0, float(d[1:].sum())) for d in got["dones"]]  # steps per episode end
    assert np.mean(episode_length[-5:]) > 1.5 * np.mean(episode_length[:2]), episode_length
