"""PPO's per-device memory with full fine-tuning vs LoRA, for GPT-Neo 125M, 1.3B and 2.7B at
fsdp = 1, 8 and 64: computed from the real shardings, nothing allocated.

  python bench/bench_lora_memory.py                 # the table (seconds)
  python bench/bench_lora_memory.py --ranks=8,64 --fsdp_sizes=1,8,64

PPO holds four models. Full fine-tuning: the policy and the value model (a copy of the reward
model) are trained (float32 master weights + AdamW's two moments), the reference (the SFT policy)
and the reward model are frozen. LoRA (`--config.model.lora.rank=R`, all six linear layers,
`--config.value_model=adapters`): the policy and the value model are adapters (the value model
with its own score head) on ONE frozen base, which is also the reference (adapters off), so only
the adapters carry optimizer state and there is no second copy of the policy; the reward model
stays frozen. Shapes come from `jax.eval_shape` of the modules the phase builds
(`lora.with_adapters`, `gpt_neo.param_shapes`, split by `lora.split` as `lora.plan` does), laid out by `sharding.param_shardings` on `AbstractMesh`es (data=1,
fsdp=N, tensor=1), the optimizer state from `loop.abstract_train_state` with PPO's optimizer
(`ppo.make_optimizer(configs/ppo.py)`), bytes per device from `sharding.per_device_bytes` (the
largest shard of each array). Activations, gradients and XLA temporaries are not included.
"""

import argparse

import jax
from jax.sharding import AbstractMesh, AxisType

from rlhf_jax import sharding
from rlhf_jax.configs import ppo as ppo_config
from rlhf_jax.models import gpt_neo
from rlhf_jax.models import lora
from rlhf_jax.training import loop
from rlhf_jax.training import ppo

GiB = 2 ** 30


def gpt_neo_configs() -> dict:
  """Hugging Face's EleutherAI/gpt-neo-125M, -1.3B and -2.7B (vocab 50257, 2048 positions,
  window 256: the dataclass defaults)."""
  return {
      "GPT-Neo 125M": gpt_neo.GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12,
                                           attention_layers=("global", "local") * 6),
      "GPT-Neo 1.3B": gpt_neo.GPTNeoConfig(hidden_size=2048, num_layers=24, num_heads=16,
                                           attention_layers=("global", "local") * 12),
      "GPT-Neo 2.7B": gpt_neo.GPTNeoConfig(hidden_size=2560, num_layers=32, num_heads=20,
                                           attention_layers=("global", "local") * 16),
  }


def placed(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def layouts(model_config: gpt_neo.GPTNeoConfig, ranks: list[int]) -> dict:
  """{(rank, score_head): (parameter shapes, logical axes)} of the modules PPO builds: the plain
  policy and score-head models (rank 0) and the same with LoRA adapters (`lora.with_adapters`,
  as `lora.plan` builds them). Traced once per model, whatever the mesh."""
  found = {}
  for head in (False, True):
    plain = gpt_neo.GPTNeo(model_config, score_head=head)
    for rank in [0] + ranks:
      module = plain if rank == 0 else lora.with_adapters(
          plain, lora.LoraSettings(rank=rank, alpha=2.0 * rank))
      found[rank, head] = (gpt_neo.param_shapes(module), gpt_neo.logical_axes(module))
  return found


def ppo_memory(found: dict, fsdp: int, rank: int) -> dict:
  """Bytes per device of PPO's trained params, optimizer state and frozen models (rank 0: full
  fine-tuning), on data=1 x fsdp x tensor=1."""
  mesh = AbstractMesh((1, fsdp, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  tx = ppo.make_optimizer(ppo_config.get_config())

  def layout(rank, head):
    shapes, axes = found[rank, head]
    return shapes, sharding.param_shardings(axes, shapes, mesh)
  reward = placed(*layout(0, True))
  policy, value = layout(rank, False), layout(rank, True)
  if rank == 0:
    trained_shapes = {"policy": policy[0], "value": value[0]}
    trained_shardings = {"policy": policy[1], "value": value[1]}
    frozen = {"reference": placed(*policy), "reward": reward}
  else:  # The trained part of each (adapters, the value head), and one frozen base.
    settings = lora.LoraSettings(rank=rank, alpha=2.0 * rank)
    parts = lambda shapes, shardings: (lora.split(shapes, settings),
                                       lora.split(shardings, settings))
    (policy_frozen, policy_trained), (policy_frozen_sh, policy_trained_sh) = parts(*policy)
    (_, value_trained), (_, value_trained_sh) = parts(*value)
    trained_shapes = {"policy": policy_trained, "value": value_trained}
    trained_shardings = {"policy": policy_trained_sh, "value": value_trained_sh}
    frozen = {"base = reference": placed(policy_frozen, policy_frozen_sh), "reward": reward}
  state = loop.abstract_train_state(trained_shapes, trained_shardings, tx, jax.random.key(0),
                                    mesh)
  return {"trained": sharding.per_device_bytes(state.params),
          "trained_count": lora.count(trained_shapes),
          "optimizer": sharding.per_device_bytes(state.opt_state),
          "frozen": sharding.per_device_bytes(frozen)}


def table(ranks: list[int], fsdp_sizes: list[int]) -> list[str]:
  lines = ["| model | fsdp | training | trained params (policy + value) | trained GiB/device | "
           "optimizer GiB/device | frozen GiB/device | total GiB/device | vs full |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, model_config in gpt_neo_configs().items():
    found = layouts(model_config, ranks)
    for fsdp in fsdp_sizes:
      full_total = None
      for rank in [0] + ranks:
        m = ppo_memory(found, fsdp, rank)
        total = m["trained"] + m["optimizer"] + m["frozen"]
        full_total = full_total or total
        label = "full" if rank == 0 else f"LoRA r{rank}"
        lines.append(f"| {name} | {fsdp} | {label} | {m['trained_count'] / 1e6:,.2f} M | "
                     f"{m['trained'] / GiB:.3f} | {m['optimizer'] / GiB:.3f} | "
                     f"{m['frozen'] / GiB:.3f} | {total / GiB:.3f} | {total / full_total:.2f} |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ranks", default="8,64")
  parser.add_argument("--fsdp_sizes", default="1,8,64")
  args = parser.parse_args()
  ranks = [int(r) for r in args.ranks.split(",")]
  fsdp_sizes = [int(n) for n in args.fsdp_sizes.split(",")]
  print(f"jax {jax.__version__}; PPO (configs/ppo.py optimizer), float32 weights and AdamW "
        "moments; LoRA on q/k/v/out_proj, c_fc, c_proj with value_model=adapters; computed from "
        "the shardings on AbstractMeshes, nothing allocated; activations not included")
  print("\n".join(table(ranks, fsdp_sizes)))


if __name__ == "__main__":
  main()
