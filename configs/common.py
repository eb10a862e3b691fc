"""Config pieces shared by the phase configs (each phase config is a small file that uses these)."""

import ml_collections


def mesh() -> ml_collections.ConfigDict:
  """Device mesh: data x fsdp x tensor; -1 takes the remaining devices (see rlhf_jax/sharding.py)."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def model() -> ml_collections.ConfigDict:
  """Numerics of the model: compute dtype, master-weight dtype, rematerialisation per block."""
  return ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", remat=False))
